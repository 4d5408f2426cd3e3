"""A private local stack for the faults, with our TCP proxy between replicas and PgBouncer.

The stack is `infra.localstack`'s own (same templates, same components, `Stack.up`),
on ports from `free_port_block` in a temporary directory, so a running `make up` is
left alone. A `Stack` subclass points the replicas' DATABASE_URL at the proxy, and
pins the service's bounds to short values so each fault fits in seconds. Everything
started here is stopped by recorded pid when the context exits, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from infra.localstack import procs
from infra.localstack.config import private_settings
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.replicas import Replica
from infra.localstack.secrets import password
from infra.localstack.stack import APP_DATABASE, APP_ROLE, Stack
from loadtests.common.prom import Scrape
from service.settings import DeploymentSettings, Settings
from tests.faults.proxy import TcpProxy

SEED_ITEMS = 200
MOST_REPLICAS = 4  # ports reserved for replicas (and their metrics ports)
# psycopg_pool's reconnect_timeout, the service's POOL_RECONNECT_TIMEOUT when unset.
DEFAULT_RECONNECT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Tuning:
    """The service's bounds in these runs: the defaults' shape, scaled down to seconds.

    `bound` is the longest any request may take: DB_DEADLINE plus a margin for HTTP,
    haproxy and a shared 2-core machine. The clients' own timeout is far above it, so a
    request that would hang is measured, not cut short.
    """

    replicas: int = 2
    # Several: the replicas reach every instance themselves (libpq's multi-host URL),
    # not through the proxy, which fronts one PgBouncer.
    pgbouncer_instances: int = 1
    workers: int = 2
    pool_min: int = 2
    pool_max: int = 4
    pool_timeout: float = 1.0
    pool_max_waiting: int = 4
    statement_timeout: float = 2.0
    db_deadline: float = 4.0
    query_wait_timeout: int = 2  # PgBouncer's, below DB_DEADLINE
    retry_after: int = 1
    graceful_timeout: int = 10
    # Seconds a worker's pool retries a lost connection before its recovery path: short,
    # so the suite reaches that path in seconds. None: the service's default (300 s).
    pool_reconnect_timeout: float | None = 3.0
    margin: float = 2.0
    client_timeout: float = 30.0

    @property
    def bound(self) -> float:
        return self.db_deadline + self.margin

    @property
    def reconnect_timeout(self) -> float:
        """The reconnect timeout the replicas run with, pinned or default."""
        if self.pool_reconnect_timeout is None:
            return DEFAULT_RECONNECT_TIMEOUT
        return self.pool_reconnect_timeout

    def service(self) -> dict[str, object]:
        """The service settings these runs pin (the rest come from the environment)."""
        pinned: dict[str, object] = {}
        if self.pool_reconnect_timeout is not None:
            pinned["pool_reconnect_timeout"] = self.pool_reconnect_timeout
        return {
            **pinned,
            "workers": self.workers,
            "pool_min": self.pool_min,
            "pool_max": self.pool_max,
            "pool_timeout": self.pool_timeout,
            "pool_max_waiting": self.pool_max_waiting,
            "statement_timeout": self.statement_timeout,
            "db_deadline": self.db_deadline,
            "retry_after": self.retry_after,
            "graceful_timeout": self.graceful_timeout,
            "log_level": "warning",
        }


@dataclass
class FaultStack(Stack):
    """The local stack with the replicas' database URL pointing at the proxy."""

    proxy_port: int = 0
    tuning: Tuning = field(default_factory=Tuning)

    def service_settings(self) -> Settings:
        url = (
            f"postgresql://{APP_ROLE}:{password(self.secrets, APP_ROLE)}"
            f"@127.0.0.1:{self.proxy_port}/{APP_DATABASE}"
        )
        if self.settings.pgbouncer_instances > 1:
            url = self.pgbouncer_url()
        known = {k: v for k, v in self.tuning.service().items() if k in Settings.model_fields}
        # TLS through the proxy as without it: the proxy only forwards bytes.
        tls = self.client_tls()
        known |= {"db_sslmode": tls["sslmode"], "db_sslrootcert": tls.get("sslrootcert")}
        return Settings(database_url=url, **known)  # type: ignore[arg-type]

    def unknown_to_service(self) -> dict[str, str]:
        """Pinned settings this service's Settings has no field for, as variables.

        Settings refuses unknown keyword arguments but ignores unknown environment
        variables, so a setting the service does not read yet (POOL_RECONNECT_TIMEOUT
        before the service grows it) still reaches the replicas' environment, and
        takes effect the day the service reads it.
        """
        return {
            name.upper(): str(value)
            for name, value in self.tuning.service().items()
            if name not in Settings.model_fields
        }

    def service_env(self) -> dict[str, str]:
        """The replicas' environment, with the deployment's numbers for their start-up guard.

        A replica reads PGBOUNCER_QUERY_WAIT_TIMEOUT, REPLICAS, ... from its environment
        (DeploymentSettings); ours are set here in code, not in the environment.
        """
        deployment = {
            name.upper(): str(getattr(self.settings, name))
            for name in DeploymentSettings.model_fields
        }
        return {**deployment, **self.unknown_to_service(), **super().service_env()}


@dataclass
class Harness:
    """The running stack, the proxy, and what the faults do to them."""

    stack: FaultStack
    proxy: TcpProxy
    tuning: Tuning
    log: Path

    @property
    def lb_url(self) -> str:
        return self.stack.haproxy().url

    @property
    def direct_url(self) -> str:
        """The application role straight to PostgreSQL: for audits and lock holders."""
        return self.stack.direct_url()

    def pgbouncer(self, index: int = 1) -> PgBouncer:
        return self.stack.pgbouncer(index)

    def app_clients(self, index: int) -> int:
        """The app pools' connections on PgBouncer instance `index` (SHOW CLIENTS)."""
        clients = self.pgbouncer(index).admin("SHOW CLIENTS")
        return sum(1 for client in clients if client["database"] == APP_DATABASE)

    def replica(self, index: int) -> Replica:
        return self.stack.replica(index)

    def new_items(self, count: int, label: str) -> list[int]:
        """Fresh items for one phase, so its visits can be counted on their own."""
        with psycopg.connect(self.direct_url, autocommit=True) as conn:
            rows = conn.execute(
                "INSERT INTO items (name) SELECT %s || ' ' || g FROM generate_series(1, %s) g"
                " RETURNING id",
                (f"fault {label}", count),
            ).fetchall()
        return [int(row[0]) for row in rows]

    # ---- PgBouncer --------------------------------------------------------------------

    def pgbouncer_pid(self, index: int = 1) -> int:
        pid = procs.read_pid(self.pgbouncer(index).pid_file)
        if pid is None or not procs.alive(pid):
            raise AssertionError(f"pgbouncer-{index} is not running")
        return pid

    def signal_pgbouncer(
        self, sig: signal.Signals, timeout: float = 15.0, *, index: int = 1
    ) -> float:
        """Send `sig` and wait for PgBouncer (instance `index`) to exit; return how long
        it took."""
        pid = self.pgbouncer_pid(index)
        started = time.monotonic()
        os.kill(pid, sig)
        if not procs.wait_until(lambda: not procs.alive(pid), timeout, interval=0.02):
            raise AssertionError(f"PgBouncer did not exit within {timeout}s of {sig.name}")
        return time.monotonic() - started

    def start_pgbouncer(self) -> None:
        """Every instance the stack runs (those running are left as they are)."""
        for bouncer in self.stack.pgbouncers():
            bouncer.start()

    # ---- replicas and workers ---------------------------------------------------------

    def replica_pid(self, index: int) -> int:
        pid = procs.read_pid(self.replica(index).pid_file)
        if pid is None or not procs.alive(pid):
            raise AssertionError(f"replica-{index} is not running")
        return pid

    def worker_pids(self, index: int) -> set[int]:
        """The uvicorn workers of replica `index`: the gunicorn master's live children."""
        return children(self.replica_pid(index))

    def metrics_pids(self, index: int) -> set[int]:
        """Worker pids that have series on the replica's metrics port now."""
        scrape = Scrape.get(self.replica(index).metrics_url)
        return {int(pid) for pid in scrape.by_pid("pgscale_pool_connections")}

    def pool_gauges(self, index: int) -> dict[int, dict[str, float]]:
        """Each worker's pool gauges on replica `index` now: {pid: {metric: value}}
        (`pgscale_pool_connections_available`, `..._in_use`, `..._requests_waiting`, ...)."""
        gauges = Scrape.get(self.replica(index).metrics_url).gauges_by_pid("pgscale_pool_")
        return {int(pid): values for pid, values in gauges.items()}

    def every_replica_ready(self, streak: int | None = None) -> bool:
        """Each replica's own /readyz (on its port, not through haproxy) answers 200
        `streak` times in a row, each on a new connection (default: twice per worker,
        so both workers' pools are likely asked)."""
        streak = streak or 2 * self.tuning.workers
        return all(
            all(procs.http_status(f"{self.replica(i).url}/readyz") == 200 for _ in range(streak))
            for i in range(1, self.tuning.replicas + 1)
        )

    def lb_states(self) -> dict[str, str]:
        return self.stack.haproxy().server_states()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every replica UP in haproxy: the next fault starts from a healthy stack."""
        expected = self.tuning.replicas

        def healthy() -> bool:
            with contextlib.suppress(OSError):
                states = self.lb_states()
                return sum(1 for s in states.values() if s == "UP") == expected
            return False

        if not procs.wait_until(healthy, timeout, interval=0.2):
            raise AssertionError(f"haproxy does not see every replica UP: {self.lb_states()}")


def children(pid: int) -> set[int]:
    """Live child processes of `pid`, from /proc (never by name)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@contextlib.contextmanager
def fault_stack(tuning: Tuning | None = None, root: Path | None = None) -> Iterator[Harness]:
    """Start the private stack behind the proxy; stop all of it on exit."""
    tuning = tuning or Tuning()
    scratch = root or Path(tempfile.mkdtemp(prefix="pgscale-faults-"))
    scratch.chmod(0o755)  # PostgreSQL's user must be able to enter it
    settings, (proxy_port,) = private_settings(
        scratch / "stack",
        most_replicas=MOST_REPLICAS,
        spare=1,
        replicas=tuning.replicas,
        pgbouncer_instances=tuning.pgbouncer_instances,
        seed_items=SEED_ITEMS,
        pgbouncer_query_wait_timeout=tuning.query_wait_timeout,
    )
    stack = FaultStack(settings, proxy_port=proxy_port, tuning=tuning)
    proxy = TcpProxy(proxy_port, settings.pgbouncer_port)
    log = scratch / "stack.log"
    try:
        proxy.start()
        with (
            log.open("a") as out,
            contextlib.redirect_stdout(out),
            _environ(
                # The migration sets the role's statement_timeout (which bounds reads) from
                # the environment: the same value the replicas use for writes.
                STATEMENT_TIMEOUT=str(tuning.statement_timeout)
            ),
        ):
            stack.up()
        yield Harness(stack, proxy, tuning, log)
    finally:
        try:
            with log.open("a") as out, contextlib.redirect_stdout(out):
                stack.down()
        finally:
            proxy.stop()
            if root is None:
                shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
