"""Connection counts from PgBouncer's admin console and pg_stat_activity, and their CSV.

Plain blocking code with no Locust or gevent in it: sampler.py runs `Probe.read` in a
real OS thread. A database that does not answer leaves its columns empty; the probe
logs once when a source goes away and once when it comes back, and keeps trying.

CSV columns (`COLUMNS`), one row per sample:

- `timestamp` (UTC, ISO 8601), `elapsed_s` since the sampler started, `users` (Locust
  users running), `saturated_503` (shed 503s so far, see checks.py);
- PgBouncer, summed over its pools except the admin console's (and over every
  instance that answered, when there are several): `cl_active`, `cl_waiting`,
  `sv_active`, `sv_idle`, `sv_used`, `sv_login`, `maxwait_ms` (the longest wait of a
  queued client); `pgb_servers` (SHOW SERVERS), `pgb_clients` (SHOW CLIENTS, every
  client connection: what max_client_conn limits);
- PostgreSQL client backends but our own: `pg_client_backends`, `pg_active`,
  `pg_idle`, `pg_idle_in_transaction`, and `pg_max_connections`;
- `pgb_clients_by_replica` and `pg_backends_by_replica`: `replica-1=8;replica-2=8`,
  counted by application_name (pools name theirs `<replica>-<pid>`; behind PgBouncer a
  server connection carries the name of the last client it served);
- `pgb_clients_by_instance` and `pgb_servers_by_instance`: `pgbouncer-1=8;pgbouncer-2=8`,
  the app client and server connections of each PgBouncer instance (one that does not
  answer is left out).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, LiteralString, Self, TextIO

import psycopg
from psycopg.rows import dict_row

logger = logging.getLogger("loadtests.sampler")

APPLICATION_NAME = "pgscale-sampler"
ADMIN_DATABASE = "pgbouncer"  # PgBouncer's admin console, not an app pool
CONNECT_TIMEOUT = 2  # seconds: a dead host must not stall the sampler for long

Row = Mapping[str, Any]

COLUMNS = (
    "timestamp",
    "elapsed_s",
    "users",
    "saturated_503",
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "sv_used",
    "sv_login",
    "maxwait_ms",
    "pgb_servers",
    "pgb_clients",
    "pg_client_backends",
    "pg_active",
    "pg_idle",
    "pg_idle_in_transaction",
    "pg_max_connections",
    "pgb_clients_by_replica",
    "pg_backends_by_replica",
    "pgb_clients_by_instance",
    "pgb_servers_by_instance",
)

_PID_SUFFIX = re.compile(r"-\d+$")

# One row per client backend but ours (pid NULL: there is none), each with the limit.
PG_ACTIVITY: LiteralString = """
    SELECT limits.max_connections, a.pid, a.state, a.application_name
    FROM (SELECT current_setting('max_connections')::int AS max_connections) AS limits
    LEFT JOIN pg_stat_activity AS a
        ON a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
"""


def join_dsns(dsns: Iterable[str]) -> str:
    """Several PgBouncer consoles as one `SAMPLER_PGBOUNCER_URL` (Probe splits it)."""
    return ";".join(dsns)


def replica_of(application_name: str) -> str:
    """`replica-1-4242` -> `replica-1`: a pool names itself `<replica>-<pid>` (service/db.py)."""
    return _PID_SUFFIX.sub("", application_name) or "(unnamed)"


def by_replica(counts: Mapping[str, int]) -> str:
    """`replica-1=8;replica-2=8`, sorted, for one CSV cell."""
    return ";".join(f"{name}={count}" for name, count in sorted(counts.items()))


def bouncer_counts(pools: Iterable[Row], clients: Iterable[Row], servers: Iterable[Row]) -> Row:
    """The PgBouncer columns from SHOW POOLS, SHOW CLIENTS and SHOW SERVERS rows."""
    app_pools = [p for p in pools if p["database"] != ADMIN_DATABASE]
    all_clients = list(clients)
    per_replica = Counter(
        replica_of(c.get("application_name") or "")
        for c in all_clients
        if c["database"] != ADMIN_DATABASE
    )
    counts: dict[str, Any] = {
        name: sum(int(p[name]) for p in app_pools)
        for name in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")
    }
    waits = [int(p["maxwait"]) * 1000 + int(p.get("maxwait_us", 0)) / 1000 for p in app_pools]
    counts["maxwait_ms"] = round(max(waits, default=0.0), 1)
    counts["pgb_servers"] = sum(1 for _ in servers)
    counts["pgb_clients"] = len(all_clients)
    counts["pgb_clients_by_replica"] = by_replica(per_replica)
    counts["pgb_app_clients"] = sum(per_replica.values())
    return counts


def combined_bouncer_counts(instances: Mapping[str, Row]) -> Row:
    """The PgBouncer columns of several instances (name -> bouncer_counts) as one row."""
    summed = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")
    counts: dict[str, Any] = {
        name: sum(int(row[name]) for row in instances.values())
        for name in (*summed, "pgb_servers", "pgb_clients")
    }
    counts["maxwait_ms"] = max((row["maxwait_ms"] for row in instances.values()), default=0.0)
    per_replica: Counter[str] = Counter()
    for row in instances.values():
        per_replica.update(parse_counts(row["pgb_clients_by_replica"]))
    counts["pgb_clients_by_replica"] = by_replica(per_replica)
    counts["pgb_clients_by_instance"] = by_replica(
        {name: int(row["pgb_app_clients"]) for name, row in instances.items()}
    )
    counts["pgb_servers_by_instance"] = by_replica(
        {name: int(row["pgb_servers"]) for name, row in instances.items()}
    )
    return counts


def parse_counts(cell: str | None) -> dict[str, int]:
    """`replica-1=8;replica-2=8` -> {"replica-1": 8, "replica-2": 8} (by_replica's inverse)."""
    counts: dict[str, int] = {}
    for part in (cell or "").split(";"):
        name, _, count = part.partition("=")
        if name and count.isdigit():
            counts[name] = int(count)
    return counts


def postgres_counts(activity: Iterable[Row]) -> Row:
    """The PostgreSQL columns from PG_ACTIVITY rows."""
    rows = list(activity)
    backends = [row for row in rows if row["pid"] is not None]
    states = Counter(row["state"] or "" for row in backends)
    return {
        "pg_client_backends": len(backends),
        "pg_active": states["active"],
        "pg_idle": states["idle"],
        "pg_idle_in_transaction": sum(
            n for state, n in states.items() if state.startswith("idle in transaction")
        ),
        "pg_max_connections": rows[0]["max_connections"] if rows else None,
        "pg_backends_by_replica": by_replica(
            Counter(replica_of(row["application_name"] or "") for row in backends)
        ),
    }


@dataclass(frozen=True)
class Sample:
    """One row: when, how much load, and what each reachable source reported."""

    timestamp: datetime
    elapsed_s: float
    users: int
    saturated_503: int
    bouncer: Row | None  # None: PgBouncer not sampled or not answering
    postgres: Row | None

    def row(self) -> dict[str, Any]:
        """The sample keyed by COLUMNS; a source that did not answer leaves its cells None."""
        values: dict[str, Any] = dict.fromkeys(COLUMNS)
        values.update(
            timestamp=self.timestamp.isoformat(timespec="milliseconds"),
            elapsed_s=round(self.elapsed_s, 3),
            users=self.users,
            saturated_503=self.saturated_503,
        )
        values.update(self.bouncer or {})
        values.update(self.postgres or {})
        return values


@dataclass
class _Source:
    """One database the probe reads, its open connection, and whether it is answering."""

    name: str
    conninfo: str
    cursor_factory: type[psycopg.Cursor[Any]] | None
    conn: psycopg.Connection[Any] | None = None
    down: bool = False

    def connection(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            options: dict[str, Any] = {
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                "application_name": APPLICATION_NAME,
            }
            if self.cursor_factory is not None:
                options["cursor_factory"] = self.cursor_factory
            self.conn = psycopg.connect(self.conninfo, **options)
        return self.conn

    def query(self, statement: LiteralString) -> list[dict[str, Any]]:
        cur = self.connection().cursor(row_factory=dict_row)
        cur.execute(statement)
        return cur.fetchall()

    def failed(self, exc: psycopg.Error) -> None:
        if not self.down:
            logger.warning(
                "%s does not answer (%s); its columns stay empty until it does",
                self.name,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
        self.down = True
        self.close()

    def answered(self) -> None:
        if self.down:
            logger.warning("%s answers again", self.name)
        self.down = False

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):  # already broken: nothing to release
                self.conn.close()
            self.conn = None


@dataclass
class Probe:
    """Keeps one connection to each source and reads the counts. Blocking; not thread-safe.

    `pgbouncer` is a DSN of PgBouncer's admin console (its user listed in admin_users
    or stats_users), or several separated by `;`, one per instance (named pgbouncer-1,
    pgbouncer-2, ... in that order); `postgres` one of PostgreSQL for a role that sees
    every backend (a superuser or pg_monitor). None skips that source.
    """

    pgbouncer: str | None
    postgres: str | None
    _sources: dict[str, _Source] = field(default_factory=dict, init=False)
    _bouncers: dict[str, _Source] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        dsns = [dsn.strip() for dsn in (self.pgbouncer or "").split(";") if dsn.strip()]
        for index, dsn in enumerate(dsns, 1):
            name = f"pgbouncer-{index}"
            label = "PgBouncer" if len(dsns) == 1 else name
            # The console speaks only the simple query protocol: a ClientCursor uses it.
            self._bouncers[name] = _Source(label, dsn, psycopg.ClientCursor)
        if self.postgres:
            self._sources["postgres"] = _Source("PostgreSQL", self.postgres, None)

    def read_bouncer(self) -> Row | None:
        """The PgBouncer columns, over every instance that answered (None: none did)."""
        answered: dict[str, Row] = {}
        for name, source in self._bouncers.items():
            try:
                pools = source.query("SHOW POOLS")
                clients = source.query("SHOW CLIENTS")
                answered[name] = bouncer_counts(pools, clients, source.query("SHOW SERVERS"))
            except psycopg.Error as exc:
                source.failed(exc)
                continue
            source.answered()
        return combined_bouncer_counts(answered) if answered else None

    def read_postgres(self) -> Row | None:
        source = self._sources.get("postgres")
        if source is None:
            return None
        try:
            counts = postgres_counts(source.query(PG_ACTIVITY))
        except psycopg.Error as exc:
            source.failed(exc)
            return None
        source.answered()
        return counts

    def read(self) -> tuple[Row | None, Row | None]:
        """(PgBouncer counts, PostgreSQL counts); None for a source that did not answer."""
        return self.read_bouncer(), self.read_postgres()

    def close(self) -> None:
        for source in (*self._bouncers.values(), *self._sources.values()):
            source.close()


class CsvLog:
    """Samples appended to a CSV file, flushed row by row so a killed run keeps its data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._file.flush()
        return self

    def write(self, sample: Sample) -> None:
        assert self._writer is not None, "use CsvLog in a with block"
        assert self._file is not None
        self._writer.writerow(sample.row())
        self._file.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()
