"""Wait until the schema is migrated: `python -m infra.docker.wait_schema [--timeout S]`.

The k8s API pods run this as an init container, so a replica never serves before the
migration Job has brought the schema to the version its code expects (compose gates the
API on the migration service instead). It reads `schema_version` through DATABASE_URL,
i.e. through PgBouncer, the only database address the API's NetworkPolicy allows.
Exit code 0 once the schema is at least at this code's version, 1 on timeout.
"""

from __future__ import annotations

import argparse
import sys
import time

import psycopg

from service.migrate import STEPS
from service.settings import get_settings


def schema_version(conninfo: str) -> int | None:
    """The applied schema version, or None while the database or the table is not there."""
    try:
        with psycopg.connect(conninfo, prepare_threshold=None, connect_timeout=3) as conn:
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait in all")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    args = parser.parse_args(argv)
    wanted = len(STEPS)
    conninfo = get_settings().conninfo
    deadline = time.monotonic() + args.timeout
    while True:
        version = schema_version(conninfo)
        if version is not None and version >= wanted:
            print(f"schema at version {version} (this code needs {wanted})")
            return 0
        if time.monotonic() >= deadline:
            seen = "unreachable or not migrated" if version is None else f"at version {version}"
            print(
                f"schema {seen} after {args.timeout:.0f}s; this code needs version {wanted}:"
                " has the migration Job run?",
                file=sys.stderr,
            )
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
