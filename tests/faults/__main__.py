"""`python -m tests.faults [--only NAME ...] [--long]`: the fault suite (`make faults`).

`--long` runs the long variants instead (`make faults-long`): outages past psycopg_pool's
real 300 s reconnect timeout, with POOL_RECONNECT_TIMEOUT left at its default.

Writes reports/faults/<timestamp>/report.{json,md} (with the stack's logs beside them)
and copies them to reports/faults/latest.{json,md}. Exit code 0 only when every row
holds: nothing lost, nothing created twice, no request over the bound, only the
allowed errors, and recovery seen.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from infra.localstack.config import REPO
from infra.localstack.procs import StackError
from tests.faults import report
from tests.faults.faults import by_name, catalogue, long_catalogue
from tests.faults.harness import Tuning
from tests.faults.suite import print_table, run_suite, say

REPORTS = REPO / "reports" / "faults"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--only", nargs="+", metavar="FAULT", help="run only these faults")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument(
        "--long", action="store_true", help="the long variants, at the default reconnect timeout"
    )
    args = parser.parse_args(argv)
    known = long_catalogue() if args.long else catalogue()
    if args.list:
        for fault in known:
            say(f"{fault.name:<24} {fault.description}")
        return 0
    try:
        faults = by_name(args.only, known) if args.only else known
    except ValueError as exc:
        parser.error(str(exc))
    tuning = Tuning(pool_reconnect_timeout=None) if args.long else Tuning()
    reports = REPORTS / "long" if args.long else REPORTS
    out = reports / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        rows, meta = run_suite(faults, tuning=tuning, logs_to=out)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report.write(rows, meta, out, latest=reports)
    print_table(rows)
    ok = all(row.ok for row in rows) and not meta["aborted"]
    say(f"{'every row holds' if ok else 'SOME ROWS FAIL'}; report: {out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
