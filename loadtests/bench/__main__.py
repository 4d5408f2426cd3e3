"""`python -m loadtests.bench`: the command line (the package docstring is its help)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import loadtests.bench
from loadtests.bench.calibration import derive
from loadtests.bench.plan import Config, Endpoint, Options
from loadtests.bench.report import REPORTS, build_report, markdown, write_report
from loadtests.bench.results import median_of, paired_ratios
from loadtests.bench.rig import rig, say
from loadtests.bench.rounds import run_rounds
from loadtests.bench.runners import profile


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None]:
    """The options, and the report directory if --out named one."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench", description=loadtests.bench.__doc__
    )
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS") or 4))
    parser.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION") or 8))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--also-connections",
        default="8,16,32",
        help="GET /items/{id} as deployed at these concurrencies too (comma-separated, or '')",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy a pooled worker")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 2:
        parser.error("--rounds must be >= 1 and --duration >= 2")
    try:
        also = [int(c) for c in args.also_connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--also-connections: not a list of numbers: {args.also_connections!r}")
    if any(c < 1 for c in also):
        parser.error("--also-connections: each must be >= 1")
    options = Options(args.rounds, args.duration, args.connections, tuple(also), args.profile)
    return options, args.out


def main(argv: list[str] | None = None) -> int:
    """Start everything, run the rounds (and the profile), stop everything, report."""
    options, out_arg = parse_args(argv)
    out = out_arg or REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    profile_text = ""
    with rig() as servers:
        raw = run_rounds(servers, options)
        if options.profile:
            profile_text = profile(
                servers.replicas[Config.POOLED],
                servers.lua[Endpoint.GET_ITEM],
                options.connections,
                options.duration,
                out,
            )
    results = [median_of(runs) for runs in raw.values()]
    report = build_report(options, servers.footprints, results, paired_ratios(raw), profile_text)
    write_report(report, out, latest=out_arg is None)
    # What the capacity planner and the simulation read (service/calibration.py).
    source = f"make bench ({out.name}, {options.rounds} round(s) of {options.duration} s)"
    calibration = derive(results, source, os.cpu_count() or 1, options.connections)
    calibration.write(out / "calibration.json")
    if out_arg is None:
        calibration.write(REPORTS / "calibration.json")
    say("")
    say(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
