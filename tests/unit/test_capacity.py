"""The capacity model: a small validation against this machine's sweep, and fleets."""

from __future__ import annotations

from dataclasses import replace

from infra.localstack.config import REPO
from loadtests.capacity.fleets import fleet_plan, naive_setup, planned_setup
from loadtests.capacity.model import Mix, Setup, simulate
from loadtests.capacity.validate import (
    Row,
    cell_setup,
    coalescing_rows,
    load_summary,
    measured,
    modelled,
    parts_table,
    repeated_rows,
    sweep_calibration_of,
    sweep_rows,
    sweep_table,
    worker_shares,
)
from service.calibration import DEFAULT_CALIBRATION, load

CALIBRATION = load()
# The sweep docs/capacity/ validated against: a 2-core machine with nothing else running,
# and the bench of that morning (CPU per request then, not the shipped calibration's).
SWEEP_PATH = REPO / "docs" / "capacity" / "sweep-2026-12-01.json"
SWEEP = load_summary(SWEEP_PATH)
SWEEP_CALIBRATION = load(sweep_calibration_of(SWEEP_PATH, DEFAULT_CALIBRATION))


def test_the_model_reproduces_sweep_cells() -> None:
    """Connections exactly, req/s and p99 within 25%: a small and a crowded cell through
    PgBouncer, and one straight to PostgreSQL."""
    cells = {("pgbouncer", 1, 1), ("pgbouncer", 2, 3), ("direct", 1, 1)}
    rows = sweep_rows(SWEEP, SWEEP_CALIBRATION, duration_ms=3000, only=cells)
    assert len(rows) == 3
    for row in rows:
        assert row.problems == [], (row.mode, row.workers, row.replicas, row.problems)


def test_an_over_budget_direct_cell_fills_postgres_as_measured() -> None:
    """Direct W4R2 wants 32 connections of PostgreSQL's 27 free slots: the exporter's two
    and the sampler's one taken first, the app gets 24, as the sweep saw."""
    (row,) = sweep_rows(SWEEP, SWEEP_CALIBRATION, duration_ms=3000, only={("direct", 4, 2)})
    assert (row.measured["clients"], row.measured["backends"]) == (24, 26)
    assert [p for p in row.problems if not p.startswith(("rps", "p99"))] == []


def test_a_cell_the_model_gets_wrong_is_reported() -> None:
    """The control: the sweep's cell against a PgBouncer with a smaller pool."""
    cell = next(
        c for c in SWEEP["cells"] if (c["mode"], c["workers"], c["replicas"]) == ("pgbouncer", 2, 2)
    )
    plan = {**SWEEP["plan"], "pgbouncer_pool_size": 4}
    outcome = simulate(cell_setup(plan, cell, 1500), SWEEP_CALIBRATION)
    row = Row(
        "pgbouncer",
        2,
        2,
        1,
        measured=measured(cell),
        modelled=modelled(outcome, direct=False),
    )
    assert "servers 4 != 6" in row.problems
    assert "backends 6 != 8" in row.problems


def test_the_model_reproduces_the_benchs_coalescing() -> None:
    """Requests per statement at 16 and 64 wrk connections, within 25% of the bench's."""
    few = replace(
        CALIBRATION,
        requests_per_statement={c: CALIBRATION.requests_per_statement[c] for c in (16, 64)},
    )
    for connections, bench, model in coalescing_rows(few, duration_ms=1500):
        assert abs(model - bench) / bench <= 0.25, (connections, bench, model)


# One replica of two workers with pools of 2..4 under 64 readers: a short run.
READERS = Setup(
    replicas=1,
    workers=2,
    pool_min=2,
    pool_max=4,
    mix=Mix(read=1.0),
    users=64,
    shared_cores=2,
    duration_ms=800,
    warmup_ms=200,
)


def test_coalescing_appears_only_when_requests_queue() -> None:
    queued = simulate(READERS, CALIBRATION)
    alone = simulate(replace(READERS, users=2), CALIBRATION)
    off = simulate(replace(READERS, coalesce_max=1), CALIBRATION)
    assert queued.requests_per_statement > 3
    assert alone.requests_per_statement < 1.5
    assert off.requests_per_statement == 1.0
    assert queued.rps > off.rps  # fewer statements, less CPU per request


def test_a_planned_fleet_stays_flat_on_postgres_and_a_naive_one_is_refused() -> None:
    p = fleet_plan(10, CALIBRATION)
    planned = simulate(replace(planned_setup(p), duration_ms=1200), CALIBRATION)
    naive = simulate(replace(naive_setup(p), duration_ms=2600), CALIBRATION)
    s = p.shape
    assert planned.errors == {}
    assert planned.client_connections >= s.replicas * s.workers * s.pool_min
    assert planned.pgbouncer_servers <= s.instances * s.default_pool_size
    assert planned.postgres_backends <= s.max_connections
    # Naive: 10 x 2 x 10 connections wanted, PostgreSQL takes what it has and refuses the rest.
    assert naive.client_connections == s.max_connections - 3 - 3
    assert naive.refused > 0
    assert naive.errors.get("503 pool timeout", 0) > 0


def test_workers_that_hold_more_users_lengthen_the_tail() -> None:
    """The sweep's measured shares of users per worker reach the model: one worker with
    three times the other's users queues longer (not three times: with two workers on
    two cores the busier one also takes more of the CPU), and that is the cell's p99."""
    assert worker_shares("replica-1=24.0,8.0;replica-2=9.5,8.0") == ((24.0, 8.0), (9.5, 8.0))
    cell = next(
        c for c in SWEEP["cells"] if (c["mode"], c["workers"], c["replicas"]) == ("direct", 2, 1)
    )
    even = cell_setup(SWEEP["plan"], {**cell, "in_flight_by_worker": "replica-1=1,1"}, 1500)
    skewed = replace(even, worker_shares=((3.0, 1.0),))
    p99 = {name: simulate(s, CALIBRATION).p99_ms for name, s in (("even", even), ("3:1", skewed))}
    assert p99["3:1"] > 1.2 * p99["even"], p99


def test_the_model_takes_a_reads_time_apart_as_the_service_does() -> None:
    """Few connections for many users: a read's time goes to the checkout queue; ample
    connections: it does not queue at all. Either way the parts sit inside the latency
    the load generator sees, and the table puts them beside the sweep's."""
    base = replace(READERS, workers=1, pool_min=1, pool_max=1, users=16, coalesce_max=1)
    starved = simulate(base, CALIBRATION).read_parts
    ample = simulate(replace(base, pool_min=16, pool_max=16, users=4), CALIBRATION).read_parts
    assert starved["queue"][0] > starved["db"][0] + starved["app"][0], starved
    assert ample["queue"][1] == 0.0, ample
    for parts in (starved, ample):
        assert sum(parts[name][0] for name in ("queue", "db", "app")) <= parts["locust"][1]
    row = Row(
        "pgbouncer",
        1,
        1,
        1,
        measured={},
        modelled={},
        parts_measured={"queue": (3.9, 11.0), "locust": (13.0, 27.0)},
        parts_modelled=starved,
    )
    table = parts_table([row, replace(row, parts_measured={})])
    assert len(table) == 3  # head, rule, and only the row that was measured
    assert f"| 3.9/11 · {starved['queue'][0]:.1f}/{starved['queue'][1]:.0f} |" in table[2]
    assert "| - |" in table[2]  # db: not measured


def test_several_sweeps_are_checked_by_their_medians_with_the_spread() -> None:
    """Three sweeps of the same grid: each figure the median, measured and modelled; the
    measured req/s and p99 keep their lowest and highest; connections stay whole; a cell
    one sweep lacks is left out."""

    def row(rps: float, p99: float, clients: int, model_p99: float, workers: int = 1) -> Row:
        figures = {"clients": clients, "servers": 6, "backends": 8}
        return Row(
            "pgbouncer",
            workers,
            1,
            1,
            measured={**figures, "rps": rps, "p99_ms": p99},
            modelled={**figures, "clients": 8, "rps": 1000, "p99_ms": model_p99},
            parts_measured={"queue": (4.0, p99 / 2)},
            parts_modelled={"queue": (5.0, 6.0)},
        )

    runs = [
        [row(900, 30, 8, 14), row(800, 60, 16, 30, workers=2)],
        [row(1100, 20, 7, 16)],
        [row(1000, 50, 8, 15)],
    ]
    (combined,) = repeated_rows(runs)
    assert combined.sweeps == 3
    assert combined.measured["rps"] == 1000
    assert combined.measured["p99_ms"] == 30
    assert combined.modelled["p99_ms"] == 15
    assert combined.measured["clients"] == 8  # the lower median of 8, 7, 8: whole
    assert combined.spread == {"rps": (900, 1100), "p99_ms": (20, 50)}
    assert combined.parts_measured == {"queue": (4.0, 15.0)}
    assert "p99_ms 15 vs 30 (-50%)" in combined.problems
    assert "| 1000 (900-1100) / 1000 | 30 (20-50) / 15 |" in sweep_table([combined])[2]
    assert repeated_rows(runs[:1]) == runs[0]  # one sweep: as it is
