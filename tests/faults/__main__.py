"""`python -m tests.faults [--only NAME ...]`: the fault suite, what `make faults` runs.

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
from tests.faults.faults import by_name, catalogue
from tests.faults.suite import print_table, run_suite, say

REPORTS = REPO / "reports" / "faults"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--only", nargs="+", metavar="FAULT", help="run only these faults")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args(argv)
    if args.list:
        for fault in catalogue():
            say(f"{fault.name:<20} {fault.description}")
        return 0
    try:
        faults = by_name(args.only) if args.only else catalogue()
    except ValueError as exc:
        parser.error(str(exc))
    out = REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        rows, meta = run_suite(faults, logs_to=out)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report.write(rows, meta, out, latest=REPORTS)
    print_table(rows)
    ok = all(row.ok for row in rows) and not meta["aborted"]
    say(f"{'every row holds' if ok else 'SOME ROWS FAIL'}; report: {out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
