"""The shared Prometheus-text reader and background poller (loadtests/common)."""

from __future__ import annotations

import itertools

from infra.localstack import procs
from loadtests.common.poll import Poll
from loadtests.common.prom import Scrape

TEXT = """\
# HELP pgscale_pool_connections Connections the pool holds now.
# TYPE pgscale_pool_connections gauge
pgscale_pool_connections{pid="11"} 2.0
pgscale_pool_connections{pid="12"} 3.0
# HELP pgscale_db_deadline_exceeded_total Database calls cut off by DB_DEADLINE.
# TYPE pgscale_db_deadline_exceeded_total counter
pgscale_db_deadline_exceeded_total 4.0
# HELP pgscale_db_requests_per_statement Requests one statement served.
# TYPE pgscale_db_requests_per_statement histogram
pgscale_db_requests_per_statement_bucket{le="1.0",statement="visits"} 1.0
pgscale_db_requests_per_statement_bucket{le="+Inf",statement="visits"} 3.0
pgscale_db_requests_per_statement_count{statement="visits"} 3.0
pgscale_db_requests_per_statement_sum{statement="visits"} 9.0
pgscale_db_requests_per_statement_count{statement="items by id"} 5.0
"""


def test_scrape_reads_gauges_by_pid_counters_and_histogram_parts() -> None:
    scrape = Scrape.parse(TEXT)
    assert scrape.by_pid("pgscale_pool_connections") == {"11": 2.0, "12": 3.0}
    assert scrape.total("pgscale_pool_connections") == 5.0
    assert scrape.total("pgscale_db_deadline_exceeded", "_total") == 4.0
    assert scrape.total("pgscale_db_requests_per_statement", "_sum", statement="visits") == 9.0
    assert scrape.total("pgscale_db_requests_per_statement", "_count") == 8.0
    assert scrape.total("pgscale_missing") == 0
    assert scrape.gauges_by_pid("pgscale_pool_") == {
        "11": {"pgscale_pool_connections": 2.0},
        "12": {"pgscale_pool_connections": 3.0},
    }


def test_poll_keeps_every_reading_until_the_block_ends() -> None:
    counter = itertools.count(1)
    with Poll(lambda: next(counter), 0.01) as poll:
        assert procs.wait_until(lambda: len(poll.readings) >= 3, 10, interval=0.01)
    taken = len(poll.readings)
    assert poll.readings[:3] == [1, 2, 3]
    assert len(poll.readings) == taken  # stopped: nothing read after the block
