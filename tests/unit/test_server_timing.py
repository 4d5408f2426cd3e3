"""The load tests' Server-Timing tally: parsing, percentiles, and a worker's report."""

from __future__ import annotations

from pathlib import Path

from loadtests.common.server_timing import Tally, columns, parse, percentile, write_csv


def test_parse_reads_each_duration_and_skips_what_it_cannot() -> None:
    header = 'queue;dur=0.120, db;dur=1.5, app;dur=0.3, batch;desc=3, cache;desc="hit"'
    assert parse(header) == {"queue": 0.12, "db": 1.5, "app": 0.3}
    assert parse(None) == {}
    assert parse("garbage;;, ;dur=") == {}


def test_percentiles_follow_the_counts() -> None:
    counts = {1.0: 90, 10.0: 9, 100.0: 1}
    assert percentile(counts, 0.5) == 1.0
    assert percentile(counts, 0.95) == 10.0
    assert percentile(counts, 0.999) == 100.0
    assert percentile({}, 0.5) is None


def test_a_workers_export_merges_into_the_masters_tally(tmp_path: Path) -> None:
    worker, master = Tally(), Tally()
    for ms in (0.01, 0.02, 5.0):
        worker.add("GET", "/items/[id]", {"queue": ms, "db": 1.0, "app": 0.5})
    worker.add("GET", "/healthz", {})  # no header: nothing to count
    master.merge(worker.export())
    assert master.count("GET", "/items/[id]") == 3
    assert master.percentiles("GET", "/items/[id]")["queue"][0.99] == 5.0
    assert list(master.parts) == [("GET", "/items/[id]")]

    path = tmp_path / "run_server_timing.csv"
    write_csv(path, master, {("GET", "/items/[id]"): {0.5: 2.0, 0.95: 6.0, 0.99: 6.0}})
    head, row = path.read_text().splitlines()
    assert head.split(",") == columns()
    assert row.startswith("GET,/items/[id],3,0.02,")
    assert row.endswith(",2,6,6")
