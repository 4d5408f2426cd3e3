"""The worker's connection pool: its connections, its checks, and its recovery.

psycopg_pool reconnects a lost connection by itself, but three of its behaviours can
leave a worker unable to serve long after the database path is back (psycopg issues
#370 and #1315 describe the same "pool stuck forever"):

- it retries with an exponential backoff (1 s, 2 s, 4 s, ... up to 128 s between
  attempts), so after an outage of a few minutes its next attempt can be two minutes
  away;
- after `reconnect_timeout` (POOL_RECONNECT_TIMEOUT) it gives a connection up for good
  and only grows again when a request queues in its own waiting list, which it refuses
  first (TooManyRequests) once `max_waiting` are listed;
- a request that timed out or was cancelled stays in that list until a connection is
  handed out, so an outage with only health checks arriving fills it.

So the pool's own waiting list is unbounded here (`max_waiting=0`): POOL_MAX_WAITING is
enforced by the worker's CheckoutQueue (service/checkout.py) in front of it, which holds
at most one request per connection inside the pool. And a `PoolKeeper` watches the
pool once a second: when it has no connection and its attempts fail, the keeper
probes the database path with a connection of its own; while that fails, requests are
refused at once (503) instead of waiting in the pool for a connection that cannot
come; as soon as it succeeds, the keeper replaces the pool with a fresh one (new
connections at once, no backoff, an empty waiting list) and closes the old one. If a
fresh pool still cannot connect while the probe can, three times in a row, the worker
exits and gunicorn starts a new one.

A worker that starts while the path is down (a replica started before PgBouncer, or a
worker gunicorn starts in place of one that exited mid-outage) starts not ready and
recovers the same way: were it to fail its start, gunicorn's master would stop the
whole replica ("Worker failed to boot"), for good. Only settings the database refuses
(`refusal`: a wrong password, no such database, a certificate that does not verify)
fail the worker's start, so a broken deployment shows at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import AsyncConnection, BaseConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from service.settings import Settings

logger = logging.getLogger("service.pool")

T = TypeVar("T")

CONNECT_TIMEOUT = 2  # seconds a new connection may take (libpq's smallest useful value)
PROBE_TIMEOUT = 3.0  # seconds the keeper's probe may take, connect and SELECT 1
GIVE_UP_AFTER = 3  # fresh pools in a row that cannot connect while the probe can

# What libpq and the server say at login when these settings can never connect, as
# opposed to a path that is down for now (connection refused, timed out, a name that
# does not resolve yet, too many clients, the database starting up or shutting down).
# Neither libpq nor PgBouncer gives a connection failure a SQLSTATE, so the words it is.
REFUSALS = (
    "authentication failed",  # password or SASL, from PostgreSQL and from PgBouncer
    "no such user",  # PgBouncer
    "no such database",  # PgBouncer
    "does not exist",  # a role or database (PostgreSQL), a root certificate file (libpq)
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
    "requires a valid client certificate",
    "certificate verify failed",
    "does not match host name",
    "not permitted to log in",
    "permission denied for database",
    "server does not support ssl",
    "invalid sslmode value",
    "invalid connection option",
)

# PgBouncer's answer to a transaction's first statement while its logins to the server
# fail: until one succeeds, and it tries the next only `server_login_retry` seconds
# after a failed one, it refuses every client it has no server for and forwards nothing
# (new clients' logins it holds instead, until its next server login). A login that a
# RELOAD (any, while server TLS is on: PgBouncer then recycles every server connection)
# or a RECONNECT cuts short counts as failed, so the window opens with no outage at all.
LOGIN_FAILING = "server login has been failing"
FIRST_REPEAT_WAIT = 0.05  # seconds before the first repeat; each next waits twice as long,
MAX_REPEAT_WAIT = 0.5  # up to this: a login can succeed any moment once the window is over


class Connection(AsyncConnection[DictRow]):
    """A pooled connection that remembers when a request last gave it back."""

    returned_at: float = float("-inf")  # never: the first checkout tests it


Pool = AsyncConnectionPool[Connection]


def spoke_unasked(conn: BaseConnection[Any]) -> bool:
    """Whether the server sent something, or hung up, since the connection's last answer.

    A connection at rest has nothing to read: bytes or an end-of-file waiting on its
    socket mean PgBouncer or PostgreSQL closed it (restart, shutdown, idle timeout) or
    sent a termination notice. One zero-timeout poll(2), no round trip.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True  # already closed on our side
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class CheckAndSweep:
    """The pool's `check` callback: a connection that died while idle is replaced unseen.

    A connection given back less than `fresh_for` seconds ago gets a local test: if the
    server has sent nothing since (`spoke_unasked`), it is used as it is. Under load
    that is every checkout, and it saves a round trip per request. One that sat idle
    longer, or whose server spoke, is tested with an empty query (one round trip).
    What the local test cannot see (a connection cut silently in the last second) a
    read survives by being repeated once on another connection (`Database.read`),
    and a write by its deadline and the client's Idempotency-Key.

    On the first dead connection it sweeps every idle one (`pool.check()`): after
    PgBouncer restarts they are all dead, and psycopg_pool would otherwise try them one
    by one with a backoff of 1 s, 2 s, ... in between, long enough for the request to
    time out although a fresh connection takes milliseconds.
    """

    def __init__(self, fresh_for: float) -> None:
        self.pool: Pool | None = None
        self.fresh_for = fresh_for
        self._sweeping = False

    async def __call__(self, conn: Connection) -> None:
        if time.monotonic() - conn.returned_at < self.fresh_for and not spoke_unasked(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            if self.pool is not None and not self._sweeping:
                self._sweeping = True
                try:
                    await self.pool.check()  # uses check_connection, not this callback
                finally:
                    self._sweeping = False
            raise


def connection_kwargs(settings: Settings, prepare_threshold: int | None) -> dict[str, Any]:
    """What every connection of the worker is opened with (the pool's and the probe's)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,  # a read is one statement, one round trip
        # None unless PREPARED_STATEMENTS is on and safe (service/prepared.py).
        "prepare_threshold": prepare_threshold,
        "row_factory": dict_row,
        # PgBouncer's SHOW CLIENTS and pg_stat_activity tell workers apart by this.
        "application_name": pool_name(settings),
    }
    if "connect_timeout" not in settings.conninfo:
        # A connect through a network that drops packets would otherwise wait for TCP.
        kwargs["connect_timeout"] = CONNECT_TIMEOUT
    return kwargs


def refusal(error: BaseException) -> bool:
    """Whether a failed connection says the settings are wrong, not the path down."""
    if isinstance(error, psycopg.ProgrammingError):
        return True  # a conninfo libpq cannot parse
    message = str(error).lower()
    return any(words in message for words in REFUSALS)


def login_failing(error: BaseException) -> bool:
    """Whether PgBouncer refused this client unsent because its server logins fail: what
    was refused (a login, a statement, a transaction) can be sent again as it was."""
    return isinstance(error, psycopg.OperationalError) and LOGIN_FAILING in str(error)


def login_retry_waits(window: float) -> Iterator[float]:
    """Pauses between attempts PgBouncer refused (`login_failing`): doubling from
    FIRST_REPEAT_WAIT up to MAX_REPEAT_WAIT, all together `window` seconds
    (DB_LOGIN_RETRY_WINDOW)."""
    left, wait = window, FIRST_REPEAT_WAIT
    while left > 1e-9:
        step = min(wait, left)
        yield step
        left -= step
        wait = min(wait * 2, MAX_REPEAT_WAIT)


async def through_login_refusals(
    attempt: Callable[[], Awaitable[T]],
    window: float,
    go_on: Callable[[], bool] = lambda: True,
) -> T:
    """`attempt()`, and again after each pause of `login_retry_waits(window)` while
    PgBouncer refuses it unsent (`login_failing`) and `go_on()` says so; then the
    refusal, or any other error, is raised."""
    waits = login_retry_waits(window)
    while True:
        try:
            return await attempt()
        except psycopg.OperationalError as exc:
            wait = next(waits, None) if login_failing(exc) else None
            if wait is None or not go_on():
                raise
            logger.debug("PgBouncer refused a call unsent (%s): again in %.2f s", exc, wait)
            await asyncio.sleep(wait)


class DatabaseRefused(RuntimeError):
    """The database refuses this worker's settings: no retry can help, the start fails."""


def pool_name(settings: Settings) -> str:
    return f"{settings.replica_name}-{os.getpid()}"


def create_pool(
    settings: Settings, prepare_threshold: int | None, reconnect_failed: Any = None
) -> Pool:
    """A closed pool for this worker; `open_pool` opens it."""
    check = CheckAndSweep(fresh_for=settings.pool_check_after_idle)
    pool: Pool = AsyncConnectionPool(
        settings.conninfo,
        connection_class=Connection,
        kwargs=connection_kwargs(settings, prepare_threshold),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        timeout=settings.pool_timeout,
        # Unbounded here: POOL_MAX_WAITING is the CheckoutQueue's (module docstring).
        max_waiting=0,
        max_lifetime=settings.pool_max_lifetime,
        max_idle=settings.pool_max_idle,
        reconnect_timeout=settings.pool_reconnect_timeout,
        reconnect_failed=reconnect_failed,
        # A connection that died while idle (PgBouncer restarted, network cut) is
        # replaced at checkout instead of failing the request that drew it.
        check=check,
        # No `reset` callback: with one, psycopg_pool hands every returned connection
        # to a background task instead of to the next waiting request at once.
        name=pool_name(settings),
        open=False,
    )
    check.pool = pool
    return pool


async def open_pool(pool: Pool, settings: Settings) -> None:
    """Open the pool and wait for `pool_min` connections: a bad DSN fails the worker fast."""
    await pool.open(wait=True, timeout=settings.pool_open_timeout)
    logger.info("pool %r ready (min=%d, max=%d)", pool.name, pool.min_size, pool.max_size)


class PoolHealth(NamedTuple):
    """What one keeper tick saw of the pool, for the metrics: the pool's statistics
    since the last tick (`pop_stats`), and how long it has been without a connection."""

    stats: dict[str, int]
    without_connection: float


class PoolKeeper:
    """Owns the worker's pool, and replaces it when psycopg_pool would stay stuck.

    `pool` is the pool to check connections out of now; it changes when the keeper
    replaces it, so callers read it at each checkout, and give a connection back to
    the pool it came from. `in_use` and `in_getconn` are kept by the caller
    (Database): connections checked out, and requests inside `pool.getconn`.
    """

    def __init__(
        self,
        settings: Settings,
        prepare_threshold: int | None,
        on_stuck: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.prepare_threshold = prepare_threshold
        # What to do when this process cannot recover: by default exit the worker
        # (SIGTERM to itself: uvicorn stops, and gunicorn's master starts a new one).
        self.on_stuck = on_stuck or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.pool = self._new_pool()
        self.in_use = 0
        self.in_getconn = 0
        self.down = False  # the last probe failed: refuse requests at once
        self.replacements = 0
        self.gave_up_connections = 0  # connections psycopg_pool stopped retrying
        self._failing = False  # attempts failed since the pool last held a connection
        self._connected_at = time.monotonic()
        self._fresh_pools_failed = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _new_pool(self) -> Pool:
        return create_pool(self.settings, self.prepare_threshold, self._reconnect_failed)

    def _reconnect_failed(self, pool: Pool) -> None:
        # psycopg_pool stopped retrying one connection after POOL_RECONNECT_TIMEOUT.
        self.gave_up_connections += 1
        self._failing = True  # psycopg_pool logs it itself (a warning of psycopg.pool)

    async def open(self) -> None:
        """Open the first pool, waiting up to POOL_OPEN_TIMEOUT for POOL_MIN connections.

        If they do not come, the probe says why: settings the database refuses raise
        DatabaseRefused (the worker fails its start); a path that is down leaves the
        worker started but not ready, with a pool that keeps trying, and the keeper
        takes it from there as after any outage (module docstring).
        """
        started = time.monotonic()
        try:
            await open_pool(self.pool, self.settings)
        except PoolTimeout:
            error = await self.probe_error()
            if error is not None and refusal(error):
                raise DatabaseRefused(
                    f"pool {self.pool.name!r}: the database refuses these settings: {error}"
                ) from None
            self.pool = self._new_pool()  # the timed-out one closed itself
            await self.pool.open(wait=False)
            self._failing = True
            self.down = error is not None
            logger.warning(
                "pool %r: no connection within POOL_OPEN_TIMEOUT (%s); started not ready, "
                "recovering as soon as the database path is back",
                self.pool.name,
                error or "the probe connects: the pool is retried",
            )
            self._connected_at = started  # without a connection since the start began
            return
        self._connected_at = time.monotonic()

    async def close(self) -> None:
        """Close the pool, and any replaced one still closing."""
        await self.pool.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def checkout_failed(self) -> None:
        """A request got no connection from the pool (timed out): the pool may be stuck."""
        if not self._has_connection():
            self._failing = True

    def _has_connection(self) -> bool:
        return self.in_use > 0 or self.pool.get_stats().get("pool_available", 0) > 0

    async def run(self, interval: float, on_tick: Callable[[PoolHealth], None]) -> None:
        """Tick every `interval` seconds (at most one second apart) until cancelled."""
        interval = min(interval, 1.0)  # recovery within seconds needs a look each second
        while True:
            try:
                on_tick(await self.tick())
            except Exception:  # the keeper must outlive any one bad tick
                logger.exception("pool keeper: a tick failed")
            await asyncio.sleep(interval)

    async def tick(self) -> PoolHealth:
        """Look at the pool once; probe and replace it if it is stuck. Returns what it saw."""
        stats = self.pool.pop_stats()
        now = time.monotonic()
        if self.in_use > 0 or stats.get("pool_available", 0) > 0:
            self._connected_at = now
            self._failing = False
            self._fresh_pools_failed = 0
            if self.down:
                logger.info("pool %r has connections again", self.pool.name)
            self.down = False
            return PoolHealth(stats, 0.0)
        if stats.get("connections_errors", 0):
            self._failing = True
        if not self._failing:
            # No connection, and none wanted (POOL_MIN=0 at rest) or none tried yet.
            self._connected_at = now
            return PoolHealth(stats, 0.0)
        if await self.probe():
            await self._replace()
        elif not self.down:
            self.down = True
            logger.warning(
                "pool %r: the database path is down; refusing requests until it is back",
                self.pool.name,
            )
        return PoolHealth(stats, time.monotonic() - self._connected_at)

    async def probe(self) -> bool:
        """Whether a connection of our own, outside the pool, answers `SELECT 1` now."""
        return await self.probe_error() is None

    async def probe_error(self) -> Exception | None:
        """Why a connection of our own, outside the pool, cannot answer `SELECT 1` now.

        PgBouncer's refusal while its server logins fail is asked again for up to
        DB_LOGIN_RETRY_WINDOW: a login a RELOAD cut short opens that window with the
        path up, and a path down still says so when the window is over.
        """
        try:
            await through_login_refusals(self._probe_once, self.settings.db_login_retry_window)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            logger.debug("probe failed: %s", exc)
            return exc if str(exc) else TimeoutError(f"no answer within {PROBE_TIMEOUT} s")
        return None

    async def _probe_once(self) -> None:
        kwargs = connection_kwargs(self.settings, None)
        kwargs["application_name"] = f"{kwargs['application_name']}-probe"
        async with asyncio.timeout(PROBE_TIMEOUT):
            conn = await AsyncConnection.connect(self.settings.conninfo, **kwargs)
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close()

    async def _replace(self) -> None:
        """The path is back but the pool has no connection: start over with a new pool."""
        old, new = self.pool, self._new_pool()
        try:
            await open_pool(new, self.settings)
        except PoolTimeout:
            await new.close()
            if not await self.probe():
                # The path went down again since the probe: an outage, not a stuck worker.
                self.down = True
                logger.warning("pool %r: the database path went down again", old.name)
                return
            self._fresh_pools_failed += 1
            logger.error(
                "pool %r: a fresh pool got no connection although the probe did (%d in a row)",
                old.name,
                self._fresh_pools_failed,
            )
            if self._fresh_pools_failed >= GIVE_UP_AFTER:
                self.give_up()
            return
        self.pool = new
        self.replacements += 1
        self.down = False
        self._failing = False
        self._fresh_pools_failed = 0
        self._connected_at = time.monotonic()
        logger.warning("pool %r replaced: the database path is back", new.name)
        # Its waiting requests get PoolClosed and try the new pool (Database._connection);
        # connections still out are closed when they come back.
        task = asyncio.get_running_loop().create_task(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def give_up(self) -> None:
        """Exit the worker (gunicorn starts a new one): a case this process cannot fix."""
        logger.error("pool %r cannot recover in this process: the worker exits", self.pool.name)
        self.on_stuck()
