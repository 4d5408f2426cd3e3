"""`python -m loadtests.sweep`: the command line (the package docstring is its help)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import loadtests.sweep
from infra.localstack import procs
from infra.localstack.config import REPO
from loadtests.sweep.plan import Mode, Plan, grid
from loadtests.sweep.report import write_report
from loadtests.sweep.runners import say, sweep

REPORTS = REPO / "reports" / "sweep"


def parse_args(argv: list[str] | None) -> tuple[Plan, Path | None]:
    """The plan, and the report directory if --out named one."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.sweep", description=loadtests.sweep.__doc__
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=grid(os.environ.get("WORKERS_GRID") or "1 2 4")
    )
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=grid(os.environ.get("REPLICAS_GRID") or "1 2 3")
    )
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        default=grid(os.environ.get("INSTANCES_GRID") or "1 2"),
        help="PgBouncer instances (the PgBouncer cells only)",
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
    modes = [mode.value for mode in Mode]
    parser.add_argument("--modes", nargs="+", choices=modes, default=modes)
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    args = parser.parse_args(argv)
    if args.duration < 3:
        parser.error("--duration must be at least 3 seconds")
    if min(args.workers) < 1 or min(args.replicas) < 1 or min(args.instances) < 1:
        parser.error("grid values must be positive integers")
    plan = Plan(
        workers=tuple(args.workers),
        replicas=tuple(args.replicas),
        pool_max=args.pool_max,
        duration=args.duration,
        direct_max_connections=args.direct_max_connections,
        pgbouncer_pool_size=args.pgbouncer_pool_size,
        modes=tuple(Mode(m) for m in args.modes),
        instances=tuple(args.instances),
    )
    return plan, args.out


def main(argv: list[str] | None = None) -> int:
    """Run the plan, write the report; exit 0 when every cell went as predicted."""
    plan, out_arg = parse_args(argv)
    out = out_arg or REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    say(f"sweep: {len(plan.cells())} cells x {plan.duration}s, report in {out}")
    try:
        cells = sweep(plan, out)
    except procs.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_report(plan, cells, out)
    if out_arg is None:
        latest = REPORTS / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    say(f"report: {out / 'report.md'}")
    return 0 if all(c.as_predicted for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
