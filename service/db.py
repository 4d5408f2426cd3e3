"""The worker's connection pool, and database calls bounded by one deadline.

Rules for PgBouncer in transaction mode (see DESIGN.md): no server-side prepared
statements (`prepare_threshold=None`), no session state (only `SET LOCAL`), reads are
one autocommit statement (one round trip), writes run in an explicit transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from service.errors import DatabaseDeadline
from service.metrics import NullPoolObserver, PoolObserver
from service.prepared import describe_prepared_statements, prepare_threshold
from service.settings import DeploymentSettings, Settings

logger = logging.getLogger("service.db")

T = TypeVar("T")
Connection = AsyncConnection[DictRow]
Pool = AsyncConnectionPool[Connection]


# Whether the connection a request checks out must be tested first (see CheckAndSweep).
_MUST_CHECK: ContextVar[bool] = ContextVar("must_check", default=True)


class CheckAndSweep:
    """The pool's `check` callback: a connection that died while idle is replaced unseen.

    Writes always test their connection at checkout (an empty query, one round trip):
    a write must never be sent on a dead connection, since it cannot be safely repeated.
    Reads skip the test when the connection came back to the pool less than
    `fresh_for` seconds ago; under load that saves a round trip per request, and a read
    that finds its connection dead is repeated once on a tested one (`Database._read`).

    On the first dead connection it sweeps every idle one (`pool.check()`): after
    PgBouncer restarts they are all dead, and psycopg_pool would otherwise try them one
    by one with a backoff of 1 s, 2 s, ... in between, long enough for the request to
    time out although a fresh connection takes milliseconds.
    """

    def __init__(self, fresh_for: float) -> None:
        self.pool: Pool | None = None
        self.fresh_for = fresh_for
        self._returned_at: WeakKeyDictionary[Connection, float] = WeakKeyDictionary()
        self._sweeping = False

    async def returned(self, conn: Connection) -> None:
        """The pool's `reset` callback: note when the connection came back."""
        self._returned_at[conn] = time.monotonic()

    async def __call__(self, conn: Connection) -> None:
        if not _MUST_CHECK.get():
            returned = self._returned_at.get(conn)
            if returned is not None and time.monotonic() - returned < self.fresh_for:
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
        connection_class=AsyncConnection[DictRow],
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
        reset=check.returned,
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
        # Calls past their deadline, still cancelling in the background (see _bounded);
        # held here so they are not garbage-collected half-way.
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._set_statement_timeout = sql.SQL("SET LOCAL statement_timeout = {}").format(
            sql.Literal(f"{int(settings.statement_timeout * 1000)}ms")
        )

    @asynccontextmanager
    async def _connection(self, *, must_check: bool) -> AsyncIterator[Connection]:
        """A pooled connection, with the checkout timed and its failures counted."""
        if self.per_request:
            async with await self._connect() as conn:
                yield conn
            return
        token = _MUST_CHECK.set(must_check)
        started = time.perf_counter()
        try:
            async with self.pool.connection() as conn:
                self.observer.acquired(time.perf_counter() - started)
                yield conn
        except PoolTimeout:
            self.observer.timed_out()
            raise
        except TooManyRequests:
            self.observer.rejected()
            raise
        finally:
            _MUST_CHECK.reset(token)

    async def _bounded(self, call: Coroutine[Any, Any, T], seconds: float) -> T:
        """Await `call`, but give up after `seconds` whatever the network does.

        Cancelling a psycopg call does not end it at once: psycopg sends the server a
        cancel request and waits for the query to stop, and through a network that
        silently drops packets it waits for a long time. So the call runs as a task of
        its own; past `seconds` it is cancelled and left to finish that clean-up in the
        background (its connection then goes back to the pool or is discarded), and
        TimeoutError is raised now.
        """
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task}, timeout=seconds)
        except asyncio.CancelledError:
            task.cancel()  # the request itself was cancelled (client gone, shutdown)
            raise
        if task in done:
            return task.result()
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)
        raise TimeoutError(f"no answer within {seconds} s")

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the request was answered already

    async def _within_deadline(self, call: Coroutine[Any, Any, T]) -> T:
        try:
            return await self._bounded(call, self.deadline)
        except TimeoutError as exc:
            self.observer.deadline_exceeded()
            raise DatabaseDeadline from exc

    async def _read(self, run: Callable[[Connection], Awaitable[T]]) -> T:
        """One read statement in autocommit, repeated once if its connection was dead."""
        return await self._within_deadline(self._read_once_or_twice(run))

    async def _read_once_or_twice(self, run: Callable[[Connection], Awaitable[T]]) -> T:
        used: Connection | None = None
        try:
            async with self._connection(must_check=False) as conn:
                used = conn
                return await run(conn)
        except psycopg.OperationalError:
            if used is None or not used.broken:
                raise  # the query failed, not the connection: report it
            logger.info("connection of %r found dead by a read: repeating it", self.pool.name)
        async with self._connection(must_check=True) as conn:
            return await run(conn)

    async def fetch_one(self, query: sql.Composable | str, params: Any = None) -> DictRow | None:
        """Run one read statement in autocommit and return its first row."""

        async def run(conn: Connection) -> DictRow | None:
            cur = await conn.execute(query, params)  # type: ignore[arg-type]
            return await cur.fetchone()

        return await self._read(run)

    async def fetch_all(self, query: sql.Composable | str, params: Any = None) -> list[DictRow]:
        """Run one read statement in autocommit and return all its rows."""

        async def run(conn: Connection) -> list[DictRow]:
            cur = await conn.execute(query, params)  # type: ignore[arg-type]
            return await cur.fetchall()

        return await self._read(run)

    async def transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one explicit transaction with a statement timeout set LOCAL.

        Its connection is always tested first, and it is never repeated. Pipeline mode
        sends BEGIN, SET LOCAL and the first statements together.
        """
        return await self._within_deadline(self._transaction(work))

    async def _transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        async with (
            self._connection(must_check=True) as conn,
            conn.pipeline(),
            conn.transaction(),
        ):
            await conn.execute(self._set_statement_timeout)
            return await work(conn)

    async def write_one(self, statement: sql.Composable) -> DictRow | None:
        """One write statement in its own transaction, in a single round trip.

        BEGIN, SET LOCAL statement_timeout, the statement and COMMIT travel as one
        simple-protocol query: PostgreSQL runs them in order and stops at the first
        error, leaving nothing committed. The statement must carry its values as
        `sql.Literal`s (the simple protocol has no parameters). Use `transaction` when
        the code must decide something before COMMIT.
        """
        query = sql.SQL("BEGIN; {}; {}; COMMIT").format(self._set_statement_timeout, statement)
        return await self._within_deadline(self._write_one(query))

    async def _write_one(self, query: sql.Composed) -> DictRow | None:
        async with self._connection(must_check=True) as conn:
            cur = conn.cursor()
            try:
                await cur.execute(query)
            except psycopg.Error:
                if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK")  # the failed BEGIN block
                raise
            row: DictRow | None = None
            while True:  # results: BEGIN, SET, the statement, COMMIT
                if cur.pgresult is not None and cur.pgresult.status == ExecStatus.TUPLES_OK:
                    row = await cur.fetchone()
                if not cur.nextset():
                    return row

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
        return await AsyncConnection.connect(
            self.settings.conninfo,
            autocommit=True,
            prepare_threshold=None,  # a new connection per request never reuses one
            row_factory=dict_row,
            connect_timeout=max(1, int(self.settings.pool_timeout)),
        )
