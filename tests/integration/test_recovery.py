"""Outages longer than the pool's reconnect timeout: every worker serves again by itself.

psycopg_pool gives a lost connection up after `reconnect_timeout` and keeps timed-out
waiters in its own queue (service/pool.py says how the worker works around both).
These tests cross that line for real: PgBouncer stays down until every worker's pool
has given its connections up, with nothing but health checks arriving, and then comes
back. Each waits on the workers' own metrics, never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from infra.localstack import procs
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.replicas import Replica
from loadtests.common.poll import Poll
from loadtests.common.prom import Scrape
from service.db import Database
from service.pool import PoolKeeper
from service.settings import Settings
from tests.support.stack import APP, Databases, StartService, make_items, stopped

pytestmark = pytest.mark.slow  # gunicorn, and PgBouncer stopped until pools give up

RECONNECT_TIMEOUT = 2.0
WORKERS = 2
RECOVERED_WITHIN = 15.0  # seconds: generous for a loaded 2-core machine (target: 5)


@pytest.fixture(scope="module")
def own_bouncer(databases: Databases) -> Iterator[PgBouncer]:
    """A PgBouncer of this module's own, so stopping it disturbs no other test."""
    with databases.running_bouncer("pgbouncer-recovery", server_login_retry=1) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def replica(start_service: StartService, own_bouncer: PgBouncer) -> Replica:
    return start_service(
        database_url=own_bouncer.app_conninfo(APP),
        workers=WORKERS,
        pool_min=2,
        pool_max=4,
        pool_timeout=1.0,
        pool_max_waiting=8,
        pool_reconnect_timeout=RECONNECT_TIMEOUT,
    )


def health_checks(url: str) -> Poll[int | None]:
    """What a load balancer sends while nobody else does: /readyz, four times a second."""
    return Poll(lambda: procs.http_status(f"{url}/readyz", timeout=5), 0.25)


def per_worker(replica: Replica, name: str, scrape: Scrape | None = None) -> dict[str, float]:
    """pid -> value: a gauge, or a per-worker counter (asked by its `_total` name), from
    `scrape` or a new reading of the replica's metrics."""
    scrape = scrape or Scrape.get(replica.metrics_url)
    if name.endswith("_total"):
        return scrape.by_pid(name.removesuffix("_total"), "_total")
    return scrape.by_pid(name)


def every_worker(
    replica: Replica, name: str, test: float | None = None, scrape: Scrape | None = None
) -> bool:
    """Whether all WORKERS workers report `name`, and each value passes `test`."""
    values = per_worker(replica, name, scrape)
    return len(values) == WORKERS and all(
        (v > 0 if test is None else v == test) for v in values.values()
    )


def workers_reporting(replica: Replica, name: str) -> dict[str, float]:
    """`per_worker`, or nothing while the replica's metrics port does not answer yet."""
    try:
        return per_worker(replica, name)
    except httpx.HTTPError:
        return {}


def serving(replica: Replica) -> bool:
    """Every worker's pool holds an idle connection, and no probe finds the path down
    (both from one reading of the replica's metrics)."""
    scrape = Scrape.get(replica.metrics_url)
    return every_worker(
        replica, "pgscale_pool_connections_available", scrape=scrape
    ) and every_worker(replica, "pgscale_pool_database_down", test=0, scrape=scrape)


def test_an_outage_past_the_reconnect_timeout_heals_without_a_restart(
    replica: Replica, own_bouncer: PgBouncer
) -> None:
    ids = make_items(replica.url, 10)
    pids_before = set(per_worker(replica, "pgscale_pool_connections"))
    with health_checks(replica.url) as checks:
        own_bouncer.stop(timeout=30)
        # The cause: every worker's pool gave a connection up for good.
        assert procs.wait_until(
            lambda: every_worker(replica, "pgscale_pool_reconnects_given_up_total"), 60
        ), per_worker(replica, "pgscale_pool_reconnects_given_up_total")
        assert procs.wait_until(lambda: every_worker(replica, "pgscale_pool_database_down"), 30)
        # Refused at once while down, and nothing piles up behind the refusals.
        assert every_worker(replica, "pgscale_pool_requests_waiting", test=0)
        back = time.monotonic()
        own_bouncer.start()
        healed = procs.wait_until(lambda: serving(replica), RECOVERED_WITHIN)
        took = time.monotonic() - back
    assert healed, f"not every worker has connections {took:.1f} s after PgBouncer came back"
    assert 503 in checks.readings, "readiness never saw the outage"
    assert procs.wait_until(lambda: procs.http_status(f"{replica.url}/readyz") == 200, 10)
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        statuses = [http.get(f"/items/{i}").status_code for i in ids * 4]
    assert statuses == [200] * len(statuses)
    # The same workers: nobody was restarted to get here.
    assert set(per_worker(replica, "pgscale_pool_connections")) == pids_before
    assert every_worker(replica, "pgscale_pool_replacements_total")
    assert every_worker(replica, "pgscale_pool_requests_waiting", test=0)


def test_repeated_outages_heal_each_time(replica: Replica, own_bouncer: PgBouncer) -> None:
    """PgBouncer killed and started again, five times in a row, under health checks."""
    with health_checks(replica.url):
        for _ in range(5):
            own_bouncer.stop(timeout=30)
            own_bouncer.start()
    assert procs.wait_until(lambda: serving(replica), RECOVERED_WITHIN)
    ids = make_items(replica.url, 5)
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        assert [http.get(f"/items/{i}").status_code for i in ids] == [200] * 5


def test_a_worker_started_during_an_outage_starts_not_ready(
    replica: Replica, own_bouncer: PgBouncer
) -> None:
    """A worker that exits mid-outage is replaced, and the replacement must start: were
    its start to fail, gunicorn's master would stop the whole replica for good."""
    with health_checks(replica.url):
        own_bouncer.stop(timeout=30)
        assert procs.wait_until(lambda: every_worker(replica, "pgscale_pool_database_down"), 30)
        victim = min(per_worker(replica, "pgscale_pool_connections"))
        os.kill(int(victim), signal.SIGKILL)  # a pid the replica's own metrics gave

        def replaced_and_down() -> bool:
            down = workers_reporting(replica, "pgscale_pool_database_down")
            return len(down) == WORKERS and victim not in down and all(down.values())

        # The replacement waits POOL_OPEN_TIMEOUT (10 s) for its pool, then starts down.
        assert procs.wait_until(replaced_and_down, 60), workers_reporting(
            replica, "pgscale_pool_database_down"
        )
        assert procs.http_status(f"{replica.url}/readyz") == 503
        own_bouncer.start()
        assert procs.wait_until(lambda: serving(replica), RECOVERED_WITHIN)
    assert replica.running()
    assert "Worker failed to boot" not in replica.log.read_text()
    ids = make_items(replica.url, 5)
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        assert [http.get(f"/items/{i}").status_code for i in ids * 2] == [200] * 10


def test_a_replica_started_before_its_pgbouncer_serves_once_it_is_up(
    start_service: StartService, own_bouncer: PgBouncer
) -> None:
    """Started with PgBouncer down: up but not ready, then ready with the same workers."""
    with stopped(own_bouncer):
        late = start_service(
            ready=False,
            database_url=own_bouncer.app_conninfo(APP),
            workers=WORKERS,
            pool_min=1,
            pool_open_timeout=2,
        )

        def started_down() -> bool:
            down = workers_reporting(late, "pgscale_pool_database_down")
            return len(down) == WORKERS and all(down.values())

        assert procs.wait_until(started_down, 60), procs.tail(late.log)
        assert procs.http_status(f"{late.url}/readyz") == 503
        assert procs.http_status(f"{late.url}/healthz") == 200
        pids = set(per_worker(late, "pgscale_pool_connections"))
    assert procs.wait_until(lambda: serving(late), RECOVERED_WITHIN), procs.tail(late.log)
    assert set(per_worker(late, "pgscale_pool_connections")) == pids
    assert "started not ready" in late.log.read_text()
    (item,) = make_items(late.url, 1)
    assert httpx.get(f"{late.url}/items/{item}", timeout=10).status_code == 200


def _settings(bouncer: PgBouncer) -> Settings:
    return Settings(
        database_url=bouncer.app_conninfo(APP),
        pool_min=1,
        pool_max=2,
        pool_timeout=0.5,
        readiness_timeout=0.4,
        pool_reconnect_timeout=1.0,
        pool_open_timeout=5,
        metrics_enabled=False,
    )


def test_readiness_checks_leave_no_waiters_in_the_pool(own_bouncer: PgBouncer) -> None:
    """Hundreds of /readyz during an outage: psycopg_pool's own waiting list stays short."""
    settings = _settings(own_bouncer)

    async def scenario() -> tuple[int, int, int]:
        keeper = PoolKeeper(settings, None)
        await keeper.open()
        db = Database(keeper, settings)
        keeping = asyncio.create_task(keeper.run(0.2, lambda health: None))
        try:
            own_bouncer.stop(timeout=30)
            failed = 0
            for _ in range(200):
                try:
                    await db.ping(settings.readiness_timeout)
                except Exception:
                    failed += 1
            during = keeper.pool.get_stats().get("requests_waiting", 0)
            own_bouncer.start()
            deadline = time.monotonic() + RECOVERED_WITHIN
            while True:
                try:
                    await db.ping(settings.readiness_timeout)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            return failed, during, keeper.pool.get_stats().get("requests_waiting", 0)
        finally:
            keeping.cancel()
            await keeper.close()
            own_bouncer.start()

    failed, during, after = asyncio.run(scenario())
    assert failed == 200  # every check during the outage said "not ready"
    # At most the first second's checks, before the keeper's probe found the path down.
    assert during <= 10, f"{during} waiters left in the pool's queue"
    assert after == 0


def test_control_psycopg_pools_own_queue_keeps_timed_out_waiters(
    own_bouncer: PgBouncer,
) -> None:
    """What the keeper works around: the bare pool lists every waiter that gave up."""
    settings = _settings(own_bouncer)

    async def scenario() -> int:
        pool: AsyncConnectionPool = AsyncConnectionPool(
            settings.conninfo, min_size=1, max_size=2, open=False, reconnect_timeout=1.0
        )
        await pool.open(wait=True, timeout=5)
        try:
            own_bouncer.stop(timeout=30)
            await pool.check()  # the dead connection is noticed and dropped
            for _ in range(100):
                try:
                    async with pool.connection(timeout=0.02):
                        pass
                except Exception:  # noqa: S110 (timing out is the point)
                    pass
            return pool.get_stats().get("requests_waiting", 0)
        finally:
            await pool.close()
            own_bouncer.start()

    assert asyncio.run(scenario()) >= 100
