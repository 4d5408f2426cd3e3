"""The model against this machine: every cell of a sweep, and the bench's coalescing.

A sweep cell (loadtests/sweep/) is R replicas x W workers behind haproxy (leastconn),
POOL_MIN 1, POOL_MAX P, coalescing off, Locust's saturate.py with 4 users per pooled
connection (at most 400, all started within the first second), and N PgBouncers (each
connection to one at random) with default_pool_size 6, or PostgreSQL direct with
max_connections 30. The model runs the same cell on 2 shared cores with the costs of
the sweep's own day (sweep_calibration_of) and says whether it agrees: connections
exactly (client, PgBouncer server, PostgreSQL backends), req/s and p99 within 25%;
where the sweep recorded them, it also puts the reads' Server-Timing parts (queue, db,
app) and Locust's latency beside the model's, which says where a short p99 comes from.
The bench's requests per statement (GET /items/{id} as deployed at each wrk concurrency,
one replica of 2 workers with pools of 4) are reproduced the same way, and printed
beside the measured.

Not from the bench:
- Locust's and haproxy's CPU per request: the cell's own (locust_ms_per_request,
  haproxy_ms_per_request: their processes' CPU over the cell's steady part, which sweeps
  record since 2026-12-02), else LOCUST_MS and HAPROXY_MS, measured once here
  on a 1-replica stack under saturate.py (/proc CPU of the Locust process and of
  haproxy over the requests Locust made, 32 and 96 users, 15 s each, startup
  subtracted), on 2026-12-02, when the machine ran slower than on the sweep's morning
  (the benches either side, docs/bench.md at 838259d and b938693, put the framework
  ceiling at 0.141 and 0.144 ms per request, against 0.104 that morning): likely too
  high for the 2026-12-01 sweep, they are used as measured.
- PostgreSQL's other clients: the exporter's two connections (every direct cell's
  backends less its clients), and the sampler's superuser connection, which takes a
  free slot as Locust starts (loadtests/common/sampler.py; it does not count itself).
- How the workers of each replica shared the users: each worker's mean requests in
  flight, which the sweep measures in every cell (in_flight_by_worker; the kernel hands
  each new connection to one waiting worker, not in turn, so a worker can hold four
  times another's users, and its queue is the cell's latency tail). A condition of the
  cell, like the split over PgBouncers, not a result; without it users go to a worker
  at random.
- Locust's start: --spawn-rate equal to --users (loadtests/sweep/runners.py), so every
  user has started after one second, and --reset-stats then starts the cell's numbers
  afresh (sweeps from before 2026-12-02 counted that second too); the model measures
  from 1.5 s (WARMUP_MS).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtests.capacity.model import Mix, Outcome, Setup, simulate
from loadtests.sweep.probes import parse_parts
from service.calibration import Calibration

LOCUST_MS = 0.24  # Locust (FastHttpUser) per request, one process
HAPROXY_MS = 0.075
WRK_THREADS = 2  # the bench's wrk: its cost is spread over its threads
BROWSE = Mix(read=0.8, list=0.2)  # browse.py's tasks: 4 reads by id, 1 page
TOLERANCE = 0.25
CONNECTIONS = ("clients", "servers", "backends")  # must agree exactly
SPAWN_MS = 1000.0  # Locust's users all started within the first second
WARMUP_MS = 1500.0  # then pools have grown: what the model measures starts here


@dataclass(frozen=True)
class Row:
    """One sweep cell: what was measured, what the model says, whether they agree."""

    mode: str
    workers: int
    replicas: int
    instances: int
    measured: dict[str, float]
    modelled: dict[str, float]
    # A read's Server-Timing parts and Locust's latency, (p50, p99) ms: the sweep's
    # (empty before 2026-12-02) and the model's.
    parts_measured: dict[str, tuple[float, float]] = field(default_factory=dict)
    parts_modelled: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Of several sweeps (repeated_rows): how many, and the lowest and highest measured
    # req/s and p99, the spread the same code shows run to run on this machine.
    sweeps: int = 1
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.mode, self.workers, self.replicas, self.instances)

    @property
    def problems(self) -> list[str]:
        found = []
        for name in CONNECTIONS:
            if self.measured[name] != self.modelled[name]:
                found.append(f"{name} {self.modelled[name]:g} != {self.measured[name]:g}")
        for name in ("rps", "p99_ms"):
            m, s = self.measured[name], self.modelled[name]
            if m and abs(s - m) / m > TOLERANCE:
                found.append(f"{name} {s:.0f} vs {m:.0f} ({(s - m) / m:+.0%})")
        return found


def cell_setup(
    plan: dict[str, Any], cell: dict[str, Any], duration_ms: float, seed: int = 1
) -> Setup:
    """The model of one sweep cell."""
    direct = cell["mode"] == "direct"
    clients = cell["replicas"] * cell["workers"] * plan["pool_max"]
    return Setup(
        replicas=cell["replicas"],
        workers=cell["workers"],
        pool_min=1,
        pool_max=plan["pool_max"],
        mix=BROWSE,
        users=min(400, plan["users_per_connection"] * clients),
        coalesce_max=1,
        via_pgbouncer=not direct,
        instances=1 if direct else int(cell.get("pgbouncer_instances") or 1),
        default_pool_size=plan["pgbouncer_pool_size"],
        max_connections=cell["postgres_max_connections"],
        shared_cores=2,
        load_generator_ms=cell.get("locust_ms_per_request") or LOCUST_MS,
        balancer_ms=cell.get("haproxy_ms_per_request") or HAPROXY_MS,
        spawn_ms=SPAWN_MS,
        worker_shares=worker_shares(cell.get("in_flight_by_worker") or ""),
        # The sampler (loadtests/common/sampler.py) is a superuser connection opened as
        # Locust starts: it takes a free slot, not a reserved one.
        superusers=1 if direct else 0,
        duration_ms=duration_ms,
        warmup_ms=min(WARMUP_MS, duration_ms / 2),
        seed=seed,
    )


def worker_shares(in_flight: str) -> tuple[tuple[float, ...], ...]:
    """`replica-1=25.1,14.9;replica-2=9.0,8.0` -> ((25.1, 14.9), (9.0, 8.0)): how the
    sweep's workers shared the users (sweeps before 2026-12-02 did not record it)."""
    shares = []
    for part in filter(None, in_flight.split(";")):
        _, _, values = part.partition("=")
        shares.append(tuple(float(v) for v in values.split(",") if v))
    return tuple(shares)


def measured(cell: dict[str, Any]) -> dict[str, float]:
    """A sweep cell's figures under the names `modelled` gives the model's."""
    return {
        "clients": cell["measured_clients"],
        "servers": cell["pgbouncer_servers"],
        "backends": cell["postgres_backends"],
        "rps": cell["requests_per_s"],
        "p99_ms": cell["p99_ms"],
    }


def modelled(o: Outcome, direct: bool) -> dict[str, float]:
    return {
        "clients": o.client_connections,
        "servers": 0 if direct else o.pgbouncer_servers,
        "backends": o.postgres_backends,
        "rps": round(o.rps),
        "p99_ms": round(o.p99_ms, 1),
    }


def sweep_rows(
    summary: dict[str, Any],
    calibration: Calibration,
    duration_ms: float = 3000.0,
    only: set[tuple[str, int, int]] | None = None,
) -> list[Row]:
    """Each cell of a sweep's summary.json beside the model's run of it."""
    plan = summary["plan"]
    rows = []
    for cell in summary["cells"]:
        key = (cell["mode"], cell["workers"], cell["replicas"])
        instances = 0 if cell["mode"] == "direct" else int(cell.get("pgbouncer_instances") or 1)
        if only is not None and key not in only:
            continue
        outcome = simulate(cell_setup(plan, cell, duration_ms), calibration)
        rows.append(
            Row(
                mode=cell["mode"],
                workers=cell["workers"],
                replicas=cell["replicas"],
                instances=instances,
                measured=measured(cell),
                modelled=modelled(outcome, cell["mode"] == "direct"),
                parts_measured=parse_parts(cell.get("read_server_timing") or ""),
                parts_modelled=outcome.read_parts,
            )
        )
    return rows


def repeated_rows(runs: list[list[Row]]) -> list[Row]:
    """Several sweeps of the same grid, each beside its own model runs, as one: each
    figure the median over the sweeps, measured and modelled alike (connections the
    lower median, so they stay whole), with the measured req/s and p99 spread. One 20 s
    sweep is not a figure to check a model against: two of the same code on this quiet
    machine differ by more than 25% in p99 in a quarter of the cells. A cell missing from
    any sweep is left out."""
    if len(runs) == 1:
        return runs[0]
    by_key = [{row.key: row for row in run} for run in runs]
    common = [key for key in by_key[0] if all(key in rows for rows in by_key[1:])]
    combined = []
    for key in common:
        rows = [rows[key] for rows in by_key]
        spread = {
            name: (min(r.measured[name] for r in rows), max(r.measured[name] for r in rows))
            for name in ("rps", "p99_ms")
        }
        combined.append(
            replace(
                rows[0],
                measured=_median_figures([r.measured for r in rows]),
                modelled=_median_figures([r.modelled for r in rows]),
                parts_measured=_median_parts([r.parts_measured for r in rows]),
                parts_modelled=_median_parts([r.parts_modelled for r in rows]),
                sweeps=len(rows),
                spread=spread,
            )
        )
    return combined


def _median_figures(figures: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median; connections the lower median, so they stay whole."""
    return {
        name: (statistics.median_low if name in CONNECTIONS else statistics.median)(
            f[name] for f in figures
        )
        for name in figures[0]
    }


def _median_parts(each: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Each part's median p50 and p99, for the parts every sweep has (none if one lacks)."""
    names = set.intersection(*(set(p) for p in each)) if all(each) else set()
    return {
        name: (
            statistics.median(p[name][0] for p in each),
            statistics.median(p[name][1] for p in each),
        )
        for name in sorted(names)
    }


def coalescing_rows(
    calibration: Calibration, duration_ms: float = 2000.0, seeds: tuple[int, ...] = (1, 2, 3)
) -> list[tuple[int, float, float]]:
    """(wrk connections, measured, modelled requests per statement) for GET /items/{id}.

    wrk's connections stay with the worker that accepted each, so how they split over
    the workers matters: the modelled figure is the median over a few seeds' splits.
    """
    rows = []
    for connections, measured in sorted(calibration.requests_per_statement.items()):
        setup = Setup(
            replicas=1,
            workers=calibration.bench_workers,
            pool_min=2,
            pool_max=calibration.bench_pool,
            mix=Mix(read=1.0),
            users=connections,
            pinned=True,
            shared_cores=calibration.machine_cores,
            load_generator_ms=calibration.load_generator_ms * WRK_THREADS,
            duration_ms=duration_ms,
            warmup_ms=duration_ms / 4,
        )
        ratios = [
            simulate(replace(setup, seed=seed), calibration).requests_per_statement
            for seed in seeds
        ]
        rows.append((connections, measured, round(statistics.median(ratios), 2)))
    return rows


def sweep_calibration_of(sweep: Path, calibration: Path) -> Path:
    """The calibration a sweep is reproduced with: its own day's bench when one is kept
    beside it (NAME.calibration.json for NAME.json), else the given one.

    CPU per request on this machine is not a constant: the bench of the morning the
    2026-12-01 sweep ran made pgbench's SELECT 37,433/s and the framework ceiling
    18,947 req/s; the bench service/calibration.json comes from, that night, 22,634/s
    and 13,180 req/s. A sweep checked against another day's costs is off by that much.
    """
    beside = sweep.with_name(f"{sweep.stem}.calibration.json")
    return beside if beside.exists() else calibration


def load_summary(path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


def sweep_table(rows: list[Row]) -> list[str]:
    lines = [
        "| mode | W | R | PgBouncers | clients | PgBouncer servers | PostgreSQL backends |"
        " req/s | p99 ms | agrees |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def both(name: str, fmt: str = "g", r: Row = r) -> str:
            seen = f"{r.measured[name]:{fmt}}"
            if name in r.spread:  # several sweeps: their median, and lowest-highest
                low, high = r.spread[name]
                seen += f" ({low:{fmt}}-{high:{fmt}})"
            return f"{seen} / {r.modelled[name]:{fmt}}"

        verdict = "yes" if not r.problems else "no: " + "; ".join(r.problems)
        lines.append(
            f"| {r.mode} | {r.workers} | {r.replicas} | {r.instances or '-'} | {both('clients')} |"
            f" {both('servers') if r.mode != 'direct' else '-'} | {both('backends')} |"
            f" {both('rps', '.0f')} | {both('p99_ms', '.0f')} | {verdict} |"
        )
    return lines


READ_PARTS = ("queue", "db", "app", "locust")


def parts_table(rows: list[Row]) -> list[str]:
    """Where a read's time went, measured (the sweep's Server-Timing and Locust) beside
    modelled, p50/p99 ms: which part of the latency the model gets short. Empty when
    the sweep did not record the parts."""
    rows = [r for r in rows if r.parts_measured]
    if not rows:
        return []
    lines = [
        "| mode | W | R | PgBouncers | " + " | ".join(READ_PARTS) + " |",
        "|---|---|---|---|" + "---|" * len(READ_PARTS),
    ]
    for r in rows:

        def spread(name: str, r: Row = r) -> str:
            seen, model = r.parts_measured.get(name), r.parts_modelled.get(name)
            if seen is None or model is None:
                return "-"
            return f"{seen[0]:.1f}/{seen[1]:.0f} · {model[0]:.1f}/{model[1]:.0f}"

        lines.append(
            f"| {r.mode} | {r.workers} | {r.replicas} | {r.instances or '-'} | "
            + " | ".join(spread(name) for name in READ_PARTS)
            + " |"
        )
    return lines


def coalescing_table(rows: list[tuple[int, float, float]]) -> list[str]:
    lines = [
        "| wrk connections | requests per statement, measured | modelled | within 25% |",
        "|---|---|---|---|",
    ]
    for connections, measured, model in rows:
        ok = abs(model - measured) / measured <= TOLERANCE
        lines.append(f"| {connections} | {measured:.2f} | {model:.2f} | {'yes' if ok else 'no'} |")
    return lines
