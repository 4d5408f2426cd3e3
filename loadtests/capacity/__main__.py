"""`python -m loadtests.capacity`: validate the model here, then run the fleets."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import loadtests.capacity
from infra.localstack.config import REPO
from loadtests.capacity.fleets import FLEETS, run_fleets
from loadtests.capacity.report import charts, fleet_row, markdown, write
from loadtests.capacity.validate import (
    coalescing_rows,
    coalescing_table,
    load_summary,
    parts_table,
    repeated_rows,
    sweep_calibration_of,
    sweep_rows,
    sweep_table,
)
from service.calibration import DEFAULT_CALIBRATION, load

REPORTS = REPO / "reports" / "capacity"
DOCS_SWEEP = REPO / "docs" / "sweep" / "summary.json"


def shown(path: Path) -> str:
    """A path as the report names it: from the repository's root when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.capacity", description=loadtests.capacity.__doc__
    )
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument(
        "--sweep",
        type=Path,
        nargs="+",
        default=[DOCS_SWEEP],
        help="a sweep's summary.json to reproduce, or several of the same grid: each cell"
        " is then the median of the sweeps, measured and modelled, with the spread",
    )
    parser.add_argument(
        "--sweep-calibration",
        type=Path,
        default=None,
        help="the bench of the sweeps' own day (default: NAME.calibration.json beside each"
        " sweep's NAME.json if there is one, else --calibration)",
    )
    parser.add_argument("--fleets", type=int, nargs="*", default=list(FLEETS))
    parser.add_argument("--cell-ms", type=float, default=3000, help="simulated ms per cell")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    calibration = load(args.calibration)
    sweep_calibrations = [
        load(args.sweep_calibration or sweep_calibration_of(sweep, args.calibration))
        for sweep in args.sweep
    ]
    sweep_calibration = sweep_calibrations[0]
    costs_source = "; ".join(dict.fromkeys(c.source for c in sweep_calibrations))
    out = args.out or REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {line}", flush=True)

    runs = []
    for sweep, costs in zip(args.sweep, sweep_calibrations, strict=True):
        say(f"sweep cells of {sweep}, at {costs.source}")
        runs.append(sweep_rows(load_summary(sweep), costs, args.cell_ms))
    rows = repeated_rows(runs)
    print("\n".join(sweep_table(rows)), flush=True)
    print("\n".join(parts_table(rows)), flush=True)
    say("the bench's coalescing")
    coalescing = coalescing_rows(calibration)
    print("\n".join(coalescing_table(coalescing)), flush=True)
    say(f"fleets of {args.fleets} replicas")
    fleets = [fleet_row(f) for f in run_fleets(calibration, tuple(args.fleets))]
    out.mkdir(parents=True, exist_ok=True)
    pictures = charts(fleets, out)
    source = ", ".join(shown(sweep) for sweep in args.sweep)
    if len(args.sweep) > 1:
        source = f"medians of {len(args.sweep)} sweeps: {source}"
    text = markdown(rows, source, costs_source, coalescing, fleets, calibration.source, pictures)
    data = {
        "calibration": calibration.as_dict(),
        "sweep_calibration": sweep_calibration.as_dict(),
        "sweeps": [shown(sweep) for sweep in args.sweep],
        "sweep": [
            {
                "mode": r.mode,
                "instances": r.instances,
                "workers": r.workers,
                "replicas": r.replicas,
                "measured": r.measured,
                "modelled": r.modelled,
                "problems": r.problems,
                "measured_spread": r.spread,
            }
            for r in rows
        ],
        "coalescing": [{"connections": c, "measured": m, "modelled": s} for c, m, s in coalescing],
        "fleets": fleets,
    }
    write(out, text, data)
    if args.out is None:
        latest = REPORTS / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    print(text)
    say(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
