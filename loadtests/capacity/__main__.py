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
    sweep_calibration_of,
    sweep_rows,
    sweep_table,
)
from service.calibration import DEFAULT_CALIBRATION, load

REPORTS = REPO / "reports" / "capacity"
DOCS_SWEEP = REPO / "docs" / "sweep" / "summary.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.capacity", description=loadtests.capacity.__doc__
    )
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument(
        "--sweep", type=Path, default=DOCS_SWEEP, help="a sweep's summary.json to reproduce"
    )
    parser.add_argument(
        "--sweep-calibration",
        type=Path,
        default=None,
        help="the bench of the sweep's own day (default: NAME.calibration.json beside the"
        " sweep's NAME.json if there is one, else --calibration)",
    )
    parser.add_argument("--fleets", type=int, nargs="*", default=list(FLEETS))
    parser.add_argument("--cell-ms", type=float, default=3000, help="simulated ms per cell")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    calibration = load(args.calibration)
    sweep_calibration = load(
        args.sweep_calibration or sweep_calibration_of(args.sweep, args.calibration)
    )
    out = args.out or REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {line}", flush=True)

    say(f"sweep cells of {args.sweep}, at {sweep_calibration.source}")
    rows = sweep_rows(load_summary(args.sweep), sweep_calibration, args.cell_ms)
    print("\n".join(sweep_table(rows)), flush=True)
    print("\n".join(parts_table(rows)), flush=True)
    say("the bench's coalescing")
    coalescing = coalescing_rows(calibration)
    print("\n".join(coalescing_table(coalescing)), flush=True)
    say(f"fleets of {args.fleets} replicas")
    fleets = [fleet_row(f) for f in run_fleets(calibration, tuple(args.fleets))]
    out.mkdir(parents=True, exist_ok=True)
    pictures = charts(fleets, out)
    try:
        source = str(args.sweep.resolve().relative_to(REPO))
    except ValueError:
        source = str(args.sweep)
    text = markdown(
        rows, source, sweep_calibration.source, coalescing, fleets, calibration.source, pictures
    )
    data = {
        "calibration": calibration.as_dict(),
        "sweep_calibration": sweep_calibration.as_dict(),
        "sweep": [
            {
                "mode": r.mode,
                "instances": r.instances,
                "workers": r.workers,
                "replicas": r.replicas,
                "measured": r.measured,
                "modelled": r.modelled,
                "problems": r.problems,
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
