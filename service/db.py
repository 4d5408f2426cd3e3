"""The worker's connection pool, and database calls bounded by one deadline.

Rules for PgBouncer in transaction mode (see DESIGN.md): no server-side prepared
statements (`prepare_threshold=None`), no session state (only `SET LOCAL`), reads are
one autocommit statement (one round trip), writes run in an explicit transaction.

With prepared statements off, reads bind their values on the client: psycopg's
`AsyncClientCursor` quotes each value with its adapters (never by pasting text) and
sends the statement as one simple-protocol Query message. Server-side binding would
send Parse, Bind, Describe, Execute and Sync for a statement that is parsed again every
time anyway; PostgreSQL and PgBouncer spend less on the one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, BaseConnection, sql
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from service.checkout import CheckoutQueue
from service.coalesce import Coalescer, Many, One, Runs
from service.errors import DatabaseDeadline
from service.metrics import NullPoolObserver, PoolObserver
from service.prepared import describe_prepared_statements, prepare_threshold
from service.settings import DeploymentSettings, Settings

logger = logging.getLogger("service.db")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


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
    read survives by being repeated once on another connection (`Database._read`),
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


def create_pool(settings: Settings) -> Pool:
    """A closed pool for this worker; `open_pool` opens it in the lifespan."""
    name = f"{settings.replica_name}-{os.getpid()}"
    deployment = DeploymentSettings()
    threshold = prepare_threshold(settings, deployment)
    logger.info("pool %r: %s", name, describe_prepared_statements(threshold, deployment))
    check = CheckAndSweep(fresh_for=settings.pool_check_after_idle)
    pool: Pool = AsyncConnectionPool(
        settings.conninfo,
        connection_class=Connection,
        kwargs={
            "autocommit": True,  # a read is one statement, one round trip
            # None unless PREPARED_STATEMENTS is on and safe (see prepare_threshold).
            "prepare_threshold": threshold,
            "row_factory": dict_row,
            # PgBouncer's SHOW CLIENTS and pg_stat_activity tell workers apart by this.
            "application_name": name,
        },
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        timeout=settings.pool_timeout,
        max_waiting=settings.pool_max_waiting,
        max_lifetime=settings.pool_max_lifetime,
        max_idle=settings.pool_max_idle,
        # A connection that died while idle (PgBouncer restarted, network cut) is
        # replaced at checkout instead of failing the request that drew it.
        check=check,
        # No `reset` callback: with one, psycopg_pool hands every returned connection
        # to a background task instead of to the next waiting request at once.
        name=name,
        open=False,
    )
    check.pool = pool
    return pool


async def open_pool(pool: Pool, settings: Settings) -> None:
    """Open the pool and wait for `pool_min` connections: a bad DSN fails the worker fast."""
    await pool.open(wait=True, timeout=settings.pool_open_timeout)
    logger.info("pool %r ready (min=%d, max=%d)", pool.name, pool.min_size, pool.max_size)


class Database:
    """Database calls for one worker, each bounded by DB_DEADLINE.

    The pool's own timeout covers only checking a connection out. Behind PgBouncer a
    query can then queue for a server connection (`query_wait_timeout`), and run up to
    `statement_timeout`; the deadline bounds all of it so no request can hang.
    """

    def __init__(
        self, pool: Pool, settings: Settings, observer: PoolObserver | None = None
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.per_request = settings.connection_strategy == "per-request"
        self.deadline = settings.db_deadline
        self.observer = observer or NullPoolObserver()
        # Reads bind client-side unless statements may be prepared (module docstring).
        self.client_binding = (
            self.per_request or prepare_threshold(settings, DeploymentSettings()) is None
        )
        # Requests wait for a connection here, not in the pool's own queue (see there).
        self.queue = CheckoutQueue(pool.max_size, settings.pool_max_waiting, pool.timeout)
        # Calls past their deadline, still cancelling in the background (see _bounded);
        # held here so they are not garbage-collected half-way.
        self._abandoned: set[asyncio.Future[Any]] = set()
        # Rendered once: every transaction and every run_framed sends it.
        self._set_statement_timeout = (
            sql.SQL("SET LOCAL statement_timeout = {}")
            .format(sql.Literal(f"{int(settings.statement_timeout * 1000)}ms"))
            .as_bytes(None)
        )
        # run_framed's text, built once per statement: BEGIN; SET LOCAL ...; <it>; COMMIT
        self._begin_one = b"BEGIN; %s; " % self._set_statement_timeout
        self._framed: dict[str, bytes] = {}

    @asynccontextmanager
    async def _connection(self, observer: PoolObserver) -> AsyncIterator[Connection]:
        """A pooled connection, with the checkout timed and its failures counted."""
        if self.per_request:
            async with await self._connect() as conn:
                yield conn
            return
        started = time.perf_counter()
        try:
            async with self.queue.slot():
                left = self.queue.timeout - (time.perf_counter() - started)
                # getconn/putconn, not pool.connection(): that one also commits on the
                # way out, a no-op here (reads autocommit, writes end their transaction)
                # that still takes the connection's lock. putconn rolls back anything
                # left open, and discards a broken connection.
                conn = await self.pool.getconn(timeout=left)
                observer.acquired(time.perf_counter() - started)
                try:
                    yield conn
                finally:
                    conn.returned_at = time.monotonic()
                    await self.pool.putconn(conn)
        except PoolTimeout:
            observer.timed_out()
            raise
        except TooManyRequests:
            observer.rejected()
            raise

    async def _bounded(self, call: Coroutine[Any, Any, T], seconds: float) -> T:
        """Await `call`, but give up after `seconds` whatever the network does.

        Cancelling a psycopg call does not end it at once: psycopg sends the server a
        cancel request and waits for the query to stop, and through a network that
        silently drops packets it waits for a long time. So the call runs as a task of
        its own; past `seconds` it is cancelled and left to finish that clean-up in the
        background (its connection then goes back to the pool or is discarded), and
        TimeoutError is raised now.
        """
        loop = asyncio.get_running_loop()
        task = loop.create_task(call)
        # A bare future woken by the task or the timer: asyncio.wait would build a set,
        # a waiter and callbacks for it on every call, and this is every request's path.
        woken = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        task.add_done_callback(wake)
        timer = loop.call_later(seconds, wake)
        try:
            await woken
        except asyncio.CancelledError:
            task.cancel()  # the request itself was cancelled (client gone, shutdown)
            raise
        finally:
            timer.cancel()
            task.remove_done_callback(wake)
        if task.done():
            return task.result()
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)
        raise TimeoutError(f"no answer within {seconds} s")

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the request was answered already

    async def _within_deadline(self, call: Coroutine[Any, Any, T], observer: PoolObserver) -> T:
        try:
            return await self._bounded(call, self.deadline)
        except TimeoutError as exc:
            observer.deadline_exceeded()
            raise DatabaseDeadline from exc

    async def read(
        self, run: Callable[[Connection], Awaitable[T]], observer: PoolObserver | None = None
    ) -> T:
        """`run` one read statement in autocommit on a pooled connection, within
        DB_DEADLINE; repeated once, on another connection, if its connection was dead.

        `observer`: who hears of the checkout (a coalesced batch reports per request).
        """
        observer = observer or self.observer
        return await self._within_deadline(self._read_once_or_twice(run, observer), observer)

    async def _read_once_or_twice(
        self, run: Callable[[Connection], Awaitable[T]], observer: PoolObserver
    ) -> T:
        used: Connection | None = None
        try:
            async with self._connection(observer) as conn:
                used = conn
                return await run(conn)
        except psycopg.OperationalError:
            if used is None or not used.broken:
                raise  # the query failed, not the connection: report it
            logger.info("connection of %r found dead by a read: repeating it", self.pool.name)
        async with self._connection(observer) as conn:
            return await run(conn)

    async def write(
        self, run: Callable[[Connection], Awaitable[T]], observer: PoolObserver | None = None
    ) -> T:
        """`run` a write on a pooled connection, within DB_DEADLINE; never repeated
        (`run` ends its own transaction: see `run_framed`)."""
        observer = observer or self.observer
        return await self._within_deadline(self._once(run, observer), observer)

    async def _once(self, run: Callable[[Connection], Awaitable[T]], observer: PoolObserver) -> T:
        async with self._connection(observer) as conn:
            return await run(conn)

    def read_cursor(self, conn: Connection) -> AsyncCursor[DictRow]:
        """A cursor for one read: client-side binding unless statements may be prepared."""
        if self.client_binding:
            return AsyncClientCursor(conn, row_factory=dict_row)
        return conn.cursor()

    async def first_row(
        self, conn: Connection, query: sql.Composable | str, params: Any = None
    ) -> DictRow | None:
        """One read statement on `conn`: its first row."""
        cur = await self.read_cursor(conn).execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchone()

    async def all_rows(
        self, conn: Connection, query: sql.Composable | str, params: Any = None
    ) -> list[DictRow]:
        """One read statement on `conn`: all its rows."""
        cur = await self.read_cursor(conn).execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()

    async def fetch_one(self, query: sql.Composable | str, params: Any = None) -> DictRow | None:
        """Run one read statement in autocommit and return its first row."""
        return await self.read(lambda conn: self.first_row(conn, query, params))

    async def fetch_all(self, query: sql.Composable | str, params: Any = None) -> list[DictRow]:
        """Run one read statement in autocommit and return all its rows."""
        return await self.read(lambda conn: self.all_rows(conn, query, params))

    async def transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one explicit transaction with a statement timeout set LOCAL.

        Its connection is tested at checkout (CheckAndSweep), and it is never repeated.
        Pipeline mode sends BEGIN, SET LOCAL and the first statements together.
        """
        return await self.write(self._transaction(work))

    def _transaction(
        self, work: Callable[[Connection], Awaitable[T]]
    ) -> Callable[[Connection], Awaitable[T]]:
        async def run(conn: Connection) -> T:
            async with conn.pipeline(), conn.transaction():
                await conn.execute(self._set_statement_timeout)
                return await work(conn)

        return run

    async def run_framed(
        self, conn: Connection, statement: LiteralString, params: Sequence[Any]
    ) -> list[DictRow]:
        """`statement` in its own transaction on `conn`, in one round trip: the rows of
        its last statement that returns rows (a SELECT, or a RETURNING clause).

        BEGIN, SET LOCAL statement_timeout, the statement (one, or several separated by
        semicolons) and COMMIT travel as one simple-protocol Query message, its values
        bound client-side (AsyncClientCursor: the simple protocol has no parameters).
        PostgreSQL runs them in order and stops at the first error, leaving nothing
        committed. Use `transaction` when the code must decide something before COMMIT.
        """
        framed = self._framed.get(statement)
        if framed is None:  # statements are the constants of service/sql.py: a few
            framed = self._framed[statement] = b"%s%s; COMMIT" % (
                self._begin_one,
                statement.encode(),
            )
        cur = AsyncClientCursor(conn, row_factory=dict_row)
        try:
            await cur.execute(framed, params)
        except psycopg.Error:
            if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")  # the failed BEGIN block
            raise
        rows: list[DictRow] = []
        while True:  # results: BEGIN, SET, the statement(s), COMMIT
            if cur.pgresult is not None and cur.pgresult.status == ExecStatus.TUPLES_OK:
                rows = await cur.fetchall()
            if not cur.nextset():
                return rows

    def coalescer(
        self, statement: str, runs: Runs, one: One[K, R], many: Many[K, R]
    ) -> Coalescer[K, R]:
        """Requests of one kind that queue for this worker's connections together share
        one statement (service/coalesce.py); `statement` names it in the metrics. Off
        (every request alone) with COALESCE_MAX=1, and with a connection per request."""
        return Coalescer(
            runs,
            one,
            many,
            queue=self.queue,
            limit=1 if self.per_request else self.settings.coalesce_max,
            observer=self.observer,
            sizes=self.observer.statement_sizes(statement),
        )

    async def ping(self, within: float) -> None:
        """`SELECT 1` within `within` seconds, connection checkout included."""
        if self.per_request:
            async with asyncio.timeout(within), await self._connect() as conn:
                await conn.execute("SELECT 1")
            return
        await self._bounded(self._select_one(within), within)

    async def _select_one(self, within: float) -> None:
        async with self.pool.connection(timeout=within) as conn:
            await conn.execute("SELECT 1")

    async def _connect(self) -> Connection:
        """A new connection of our own: the naive pattern the benchmark compares against."""
        return await Connection.connect(
            self.settings.conninfo,
            autocommit=True,
            prepare_threshold=None,  # a new connection per request never reuses one
            row_factory=dict_row,
            connect_timeout=max(1, int(self.settings.pool_timeout)),
        )
