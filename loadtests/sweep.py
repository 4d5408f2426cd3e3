"""The workers x replicas sweep: how connections grow, with and without PgBouncer.

For every cell of WORKERS_GRID x REPLICAS_GRID (fixed POOL_MAX) it reshapes a private
local stack and runs Locust headless with loadtests/saturate.py (browse.py's reads, with
no pause between them) and four users per pooled connection, so that every pool is full
with more requests waiting, however fast the machine; with coalescing off
(COALESCE_MAX=1), so that every waiting request needs a connection of its own: the peak
the budget is for. It samples PgBouncer and PostgreSQL once a second (the sampler
plugin) and compares what it measured with service/budget.py's prediction. Then the
same grid with the replicas pointed straight at PostgreSQL and a deliberately small
max_connections: the cells the budget says cannot fit must fail, the others must not.

    .venv/bin/python -m loadtests.sweep [--workers 1 2 4] [--replicas 1 2 3] [--duration 20]

`make sweep WORKERS_GRID="1 2" REPLICAS_GRID="1" DURATION=10` runs it. The report goes to
reports/sweep/<timestamp>/ (report.md, cells.csv, summary.json, PNG charts), and
reports/sweep/latest points at the newest.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from infra.localstack import procs
from infra.localstack.config import REPO, StackSettings, private_settings
from infra.localstack.stack import Stack
from loadtests.common.poll import Poll
from loadtests.common.prom import Scrape
from service.budget import Budget, check, deployment_topology
from service.settings import Settings

REPORTS = REPO / "reports" / "sweep"
SCENARIO = REPO / "loadtests" / "saturate.py"
SEED_ITEMS = 1000


@dataclass(frozen=True)
class Plan:
    """What the sweep runs: the grid, the pool, the time per cell, the direct limit."""

    workers: tuple[int, ...]
    replicas: tuple[int, ...]
    pool_max: int
    duration: int
    direct_max_connections: int
    pgbouncer_pool_size: int
    modes: tuple[str, ...] = ("pgbouncer", "direct")
    # Requests always in flight per pooled connection: every pool full, more waiting.
    # Fewer leave a worker now and then with fewer requests than connections (haproxy
    # and the kernel spread them unevenly), and its pool short of POOL_MAX.
    users_per_connection: int = 4

    def cells(self) -> list[tuple[str, int, int]]:
        return [(m, w, r) for m in self.modes for w in self.workers for r in self.replicas]


@dataclass
class Cell:
    """One cell's prediction, measurement and verdict."""

    mode: str
    workers: int
    replicas: int
    pool_max: int
    predicted_clients: int  # R x W x POOL_MAX, from service.budget
    budget_fits: bool
    budget_server_at_peak: int
    measured_clients: int  # peak app connections into PgBouncer (direct: into PostgreSQL)
    pgbouncer_servers: int  # peak server connections PgBouncer held
    postgres_backends: int  # peak client backends PostgreSQL served
    postgres_max_connections: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: int  # unexpected answers and errors
    shed_503: int  # deliberate 503s with Retry-After (pool pressure)
    pool_waiters: int  # peak requests queued in the app pools, summed over workers
    connection_errors: int  # pool connections refused (direct: "too many clients")
    verdict: str
    as_predicted: bool


def grid(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.replace(",", " ").split())
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def say(line: str) -> None:
    print(line, flush=True)


# ---- one cell -----------------------------------------------------------------------------


def pool_pressure(http: httpx.Client, urls: list[str]) -> tuple[int, int]:
    """(requests waiting in the pools, pool connections refused so far), summed over the
    replicas' metrics ports that answer.

    A refused connection is PostgreSQL (or PgBouncer) turning down a new pool connection,
    "sorry, too many clients already" when the replicas go straight to PostgreSQL.
    """
    waiting = errors = 0
    for url in urls:
        with contextlib.suppress(httpx.HTTPError):
            metrics = Scrape.get(url, http)
            waiting += int(metrics.total("pgscale_pool_requests_waiting"))
            errors += int(metrics.total("pgscale_pool_connection_errors", "_total"))
    return waiting, errors


def replica_sum(cell: str | None) -> int:
    """`replica-1=8;replica-2=8` -> 16 (other application names ignored)."""
    total = 0
    for part in (cell or "").split(";"):
        name, _, count = part.partition("=")
        if name.startswith("replica-") and count.isdigit():
            total += int(count)
    return total


def peaks(samples_csv: Path, mode: str) -> dict[str, int]:
    """Peak connection counts over the run, from the sampler's CSV."""
    clients = servers = backends = shed = 0
    with samples_csv.open() as f:
        for row in csv.DictReader(f):
            shed = max(shed, int(row.get("saturated_503") or 0))
            column = "pgb_clients_by_replica" if mode == "pgbouncer" else "pg_backends_by_replica"
            clients = max(clients, replica_sum(row.get(column)))
            servers = max(servers, int(row.get("pgb_servers") or 0))
            backends = max(backends, int(row.get("pg_client_backends") or 0))
    return {"clients": clients, "servers": servers, "backends": backends, "shed": shed}


def locust_totals(stats_csv: Path) -> dict[str, float]:
    with stats_csv.open() as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return {
                    "requests": float(row["Request Count"]),
                    "failures": float(row["Failure Count"]),
                    "rps": float(row["Requests/s"]),
                    "p50": float(row["50%"]),
                    "p95": float(row["95%"]),
                    "p99": float(row["99%"]),
                }
    raise ValueError(f"no Aggregated row in {stats_csv}")


def run_locust(stack: Stack, users: int, duration: int, prefix: Path) -> str:
    env = {
        **os.environ,
        "SAMPLER_PGBOUNCER_URL": stack.pgbouncer().admin_conninfo(),
        "SAMPLER_POSTGRES_URL": stack.postgres().superuser_conninfo(),
        "SEED_ITEMS": str(SEED_ITEMS),
        "LOADTEST_MAX_FAIL_RATIO": "1",  # the sweep reports failures; it does not gate on them
        "LOADTEST_MAX_P95_MS": "1000000",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(SCENARIO),
            "--headless",
            "--users",
            str(users),
            "--spawn-rate",
            str(users),
            "--run-time",
            f"{duration}s",
            "--host",
            stack.haproxy().url,
            "--csv",
            str(prefix),
            "--only-summary",
            "--stop-timeout",
            "5",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    return result.stdout + result.stderr


def judge(cell: Cell, budget: Budget) -> tuple[str, bool]:
    """Does the measurement agree with the budget's prediction?"""
    if cell.mode == "pgbouncer":
        server_ceiling = budget.server_at_peak
        ok = cell.measured_clients == cell.predicted_clients and (
            cell.pgbouncer_servers <= server_ceiling
        )
        if ok:
            return (
                f"clients {cell.measured_clients} = R x W x P; PgBouncer held"
                f" {cell.pgbouncer_servers} <= {server_ceiling} server connections"
            ), True
        return (
            f"measured {cell.measured_clients} clients vs {cell.predicted_clients} predicted,"
            f" {cell.pgbouncer_servers} server connections vs ceiling {server_ceiling}"
        ), False
    # Without PgBouncer, overflowing means PostgreSQL refuses pool connections: the pools
    # stay short of their size, requests queue for what there is (or fail).
    refused = cell.connection_errors > 0 or cell.measured_clients < cell.predicted_clients
    if budget.ok and not refused:
        return "fits, and every pool reached its size", True
    if not budget.ok and refused:
        return (
            f"over budget ({cell.predicted_clients} > {budget.server_available} available):"
            f" PostgreSQL refused {cell.connection_errors} connections, pools reached"
            f" {cell.measured_clients}; {cell.failures} failures, {cell.shed_503} shed 503s,"
            f" p99 {cell.p99_ms:.0f} ms"
        ), True
    if budget.ok:
        return f"fits, yet {cell.connection_errors} connections were refused", False
    return "over budget, yet every connection was accepted", False


def run_cell(
    stack_settings: StackSettings, mode: str, workers: int, replicas: int, plan: Plan, out: Path
) -> Cell:
    os.environ.update(
        {
            "WORKERS": str(workers),
            "POOL_MIN": "1",
            "POOL_MAX": str(plan.pool_max),
            # Coalescing off: every queued request needs a connection of its own, so the
            # pools grow to POOL_MAX, the peak the budget must hold. (Coalesced, requests
            # that queue together share one, and the same load fills fewer.)
            "COALESCE_MAX": "1",
        }
    )
    settings = stack_settings.model_copy(
        update={"replicas": replicas, "via_pgbouncer": mode == "pgbouncer"}
    )
    stack = Stack(settings)
    budget = check(deployment_topology(Settings(), settings))
    log = out / "stack.log"
    with log.open("a") as stack_log, contextlib.redirect_stdout(stack_log):
        print(f"\n=== {mode} W={workers} R={replicas}")
        stack.up(enforce_budget=False)
    users = min(400, plan.users_per_connection * budget.clients_at_peak)
    prefix = out / f"{mode}-w{workers}-r{replicas}"
    metrics_urls = [stack.replica(i).metrics_url for i in range(1, replicas + 1)]
    with (
        httpx.Client(timeout=2) as http,
        Poll(functools.partial(pool_pressure, http, metrics_urls), 1.0) as pressure,
    ):
        output = run_locust(stack, users, plan.duration, prefix)
    waiters = max((waiting for waiting, _ in pressure.readings), default=0)
    refused = max((errors for _, errors in pressure.readings), default=0)
    (prefix.parent / f"{prefix.name}.locust.log").write_text(output)
    measured = peaks(Path(f"{prefix}_connections.csv"), mode)
    totals = locust_totals(Path(f"{prefix}_stats.csv"))
    cell = Cell(
        mode=mode,
        workers=workers,
        replicas=replicas,
        pool_max=plan.pool_max,
        predicted_clients=budget.clients_at_peak,
        budget_fits=budget.ok,
        budget_server_at_peak=budget.server_at_peak,
        measured_clients=measured["clients"],
        pgbouncer_servers=measured["servers"] if mode == "pgbouncer" else 0,
        postgres_backends=measured["backends"],
        postgres_max_connections=settings.postgres_max_connections,
        requests=int(totals["requests"]),
        requests_per_s=round(totals["rps"], 1),
        p50_ms=totals["p50"],
        p95_ms=totals["p95"],
        p99_ms=totals["p99"],
        failures=int(totals["failures"]),
        shed_503=measured["shed"],
        pool_waiters=waiters,
        connection_errors=refused,
        verdict="",
        as_predicted=False,
    )
    cell.verdict, cell.as_predicted = judge(cell, budget)
    return cell


# ---- the whole sweep ----------------------------------------------------------------------


def sweep(plan: Plan, out: Path) -> list[Cell]:
    cells: list[Cell] = []
    total = len(plan.cells())
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="pgscale-sweep-"))
    scratch.chmod(0o755)
    saved_env = dict(os.environ)
    try:
        base, _ = private_settings(scratch / "stack", seed_items=SEED_ITEMS)
        for mode in plan.modes:
            # Direct mode runs PostgreSQL with a small max_connections: restart it.
            settings = base.model_copy(
                update={
                    "postgres_max_connections": plan.direct_max_connections
                    if mode == "direct"
                    else base.postgres_max_connections,
                    # A small server pool: PostgreSQL's side stays flat once
                    # clients outnumber it, whatever the grid adds.
                    "pgbouncer_default_pool_size": plan.pgbouncer_pool_size,
                    "pgbouncer_reserve_pool_size": 0,
                }
            )
            try:
                for workers in plan.workers:
                    for replicas in plan.replicas:
                        n = len(cells) + 1
                        say(
                            f"[{n}/{total}] {mode:<9} W={workers} R={replicas}"
                            f" ({time.monotonic() - started:.0f}s elapsed) ..."
                        )
                        cell = run_cell(settings, mode, workers, replicas, plan, out)
                        cells.append(cell)
                        mark = "ok " if cell.as_predicted else "OFF"
                        say(
                            f"      {mark} predicted {cell.predicted_clients:>3}"
                            f" measured {cell.measured_clients:>3}"
                            f" | PgBouncer servers {cell.pgbouncer_servers:>2}"
                            f" | PostgreSQL backends {cell.postgres_backends:>3}"
                            f" | {cell.requests_per_s:>6.1f} req/s p99 {cell.p99_ms:.0f} ms"
                            f" | failures {cell.failures} shed {cell.shed_503}"
                        )
            finally:
                with (out / "stack.log").open("a") as log, contextlib.redirect_stdout(log):
                    Stack(settings).down()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(scratch, ignore_errors=True)
    return cells


def write_report(plan: Plan, cells: list[Cell], out: Path) -> None:
    from loadtests.sweep_report import charts, markdown

    rows = [asdict(c) for c in cells]
    with (out / "cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "plan": asdict(plan),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "all_as_predicted": all(c.as_predicted for c in cells),
        "cells": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pngs = charts(cells, out)
    (out / "report.md").write_text(markdown(plan, cells, pngs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.sweep", description=__doc__)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=grid(os.environ.get("WORKERS_GRID") or "1 2 4")
    )
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=grid(os.environ.get("REPLICAS_GRID") or "1 2 3")
    )
    parser.add_argument("--duration", type=int, default=int(os.environ.get("DURATION") or 20))
    parser.add_argument("--pool-max", type=int, default=int(os.environ.get("SWEEP_POOL_MAX") or 4))
    parser.add_argument(
        "--direct-max-connections",
        type=int,
        default=int(os.environ.get("SWEEP_DIRECT_MAX_CONNECTIONS") or 30),
        help="max_connections of PostgreSQL in the direct cells (small on purpose)",
    )
    parser.add_argument(
        "--pgbouncer-pool-size",
        type=int,
        default=int(os.environ.get("SWEEP_PGBOUNCER_POOL_SIZE") or 6),
        help="PgBouncer default_pool_size in the sweep (reserve 0)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["pgbouncer", "direct"], default=["pgbouncer", "direct"]
    )
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    args = parser.parse_args(argv)
    if args.duration < 3:
        parser.error("--duration must be at least 3 seconds")
    if min(args.workers) < 1 or min(args.replicas) < 1:
        parser.error("grid values must be positive integers")
    plan = Plan(
        workers=tuple(args.workers),
        replicas=tuple(args.replicas),
        pool_max=args.pool_max,
        duration=args.duration,
        direct_max_connections=args.direct_max_connections,
        pgbouncer_pool_size=args.pgbouncer_pool_size,
        modes=tuple(args.modes),
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPORTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    say(f"sweep: {len(plan.cells())} cells x {plan.duration}s, report in {out}")
    try:
        cells = sweep(plan, out)
    except procs.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_report(plan, cells, out)
    if args.out is None:
        latest = REPORTS / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    say(f"report: {out / 'report.md'}")
    return 0 if all(c.as_predicted for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
