"""Database calls for one worker, each bounded by one deadline.

Rules for PgBouncer in transaction mode (README.md, "Transaction pooling rules"): no
server-side prepared statements (`prepare_threshold=None`), no session state (only
`SET LOCAL`), reads are one autocommit statement (one round trip), writes run in an
explicit transaction. The pool itself, and its recovery, live in service/pool.py.

With prepared statements off, reads bind their values on the client: psycopg's
`AsyncClientCursor` quotes each value with its adapters (never by pasting text) and
sends the statement as one simple-protocol Query message. Server-side binding would
send Parse, Bind, Describe, Execute and Sync for a statement that is parsed again every
time anyway; PostgreSQL and PgBouncer spend less on the one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncCursor, sql
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from service.checkout import CheckoutQueue, Party
from service.context import CURRENT, Timing
from service.errors import DatabaseDown, DeadlineExceeded
from service.metrics import NullPoolObserver, PoolObserver
from service.pool import Connection, Pool, PoolKeeper, through_login_refusals
from service.settings import Settings

logger = logging.getLogger("service.db")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class Database:
    """Database calls for one worker, each bounded by DB_DEADLINE.

    The pool's own timeout covers only checking a connection out. Behind PgBouncer a
    query can then queue for a server connection (`query_wait_timeout`), and run up to
    `statement_timeout`; the deadline bounds all of it so no request can hang.
    """

    def __init__(
        self,
        keeper: PoolKeeper,
        settings: Settings,
        observer: PoolObserver | None = None,
    ) -> None:
        self.keeper = keeper
        self.settings = settings
        self.per_request = settings.connection_strategy == "per-request"
        self.deadline = settings.db_deadline
        self.observer = observer or NullPoolObserver()
        # Reads bind client-side unless statements may be prepared (module docstring).
        self.client_binding = self.per_request or keeper.prepare_threshold is None
        # Requests wait for a connection here, not in the pool's own queue (see there).
        self.queue = CheckoutQueue(
            settings.pool_max, settings.pool_max_waiting, settings.pool_timeout
        )
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

    @property
    def pool(self) -> Pool:
        """The pool connections come from now (the keeper may replace it)."""
        return self.keeper.pool

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection now: in the checkout queue, or in the pool
        while it opens one (exact: psycopg_pool's own count keeps timed-out waiters)."""
        return self.queue.waiting + self.keeper.in_getconn

    @property
    def abandoned(self) -> int:
        """Calls past their deadline, still cleaning up in the background."""
        return len(self._abandoned)

    @asynccontextmanager
    async def _connection(
        self, observer: PoolObserver, party: Party | None = None, wait: float | None = None
    ) -> AsyncIterator[Connection]:
        """A pooled connection, with the checkout timed and its failures counted.

        `party`: the coalesced batch this checkout is for (its riders wait with it);
        `wait`: seconds to wait for the connection, if less than POOL_TIMEOUT.
        """
        if self.per_request:
            async with await self._connect() as conn:
                yield conn
            return
        keeper = self.keeper
        if keeper.down:
            observer.unavailable()
            raise DatabaseDown("the database path is down (the worker's probe failed)")
        timeout = self.queue.timeout if wait is None else min(wait, self.queue.timeout)
        timing = CURRENT.get()  # None in a coalesced batch's task: the batch reports
        started = time.perf_counter()
        try:
            await self.queue.acquire(timeout, party)
        except PoolTimeout:
            observer.timed_out()
            _waited(timing, started)  # a 503 that queued says how long
            raise
        except TooManyRequests:
            observer.rejected()
            raise
        try:
            try:
                conn, pool = await self._getconn(timeout - (time.perf_counter() - started))
            except PoolTimeout:
                observer.timed_out()
                keeper.checkout_failed()
                _waited(timing, started)
                raise
            held = time.perf_counter()
            observer.acquired(held - started)
            keeper.in_use += 1
            try:
                yield conn
            finally:
                keeper.in_use -= 1
                if timing is not None:  # the request's Server-Timing (service/context.py)
                    timing.queue += held - started
                    timing.db += time.perf_counter() - held
                conn.returned_at = time.monotonic()
                # putconn rolls back anything left open, and discards a broken
                # connection; to the pool it came from, even if since replaced.
                await pool.putconn(conn)
        finally:
            self.queue.release()

    async def _getconn(self, left: float) -> tuple[Connection, Pool]:
        """A connection from the keeper's pool within `left` seconds, and that pool.

        getconn/putconn, not pool.connection(): that one also commits on the way out, a
        no-op here (reads autocommit, writes end their transaction) that still takes the
        connection's lock. A pool replaced while we waited in it (PoolClosed) is left
        for its successor, with the time that is left.
        """
        keeper = self.keeper
        deadline = time.perf_counter() + left
        while True:
            pool = keeper.pool
            keeper.in_getconn += 1
            try:
                return await pool.getconn(timeout=deadline - time.perf_counter()), pool
            except PoolClosed:
                if keeper.pool is pool or deadline <= time.perf_counter():
                    raise
            finally:
                keeper.in_getconn -= 1

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
            raise DeadlineExceeded from exc

    async def read(
        self,
        run: Callable[[Connection], Awaitable[T]],
        observer: PoolObserver | None = None,
        party: Party | None = None,
    ) -> T:
        """`run` one read statement in autocommit on a pooled connection, within
        DB_DEADLINE; repeated once, on another connection, if its connection was dead.

        `observer`: who hears of the checkout (a coalesced batch reports per request);
        `party`: the batch, whose riders wait with it.
        """
        observer = observer or self.observer
        call = self._repeating_refusals(
            lambda: self._read_once_or_twice(run, observer, party), observer
        )
        return await self._within_deadline(call, observer)

    async def _read_once_or_twice(
        self,
        run: Callable[[Connection], Awaitable[T]],
        observer: PoolObserver,
        party: Party | None,
    ) -> T:
        used: Connection | None = None
        try:
            async with self._connection(observer, party) as conn:
                used = conn
                return await run(conn)
        except psycopg.OperationalError:
            if used is None or not used.broken:
                raise  # the query failed, not the connection: report it
            logger.info("connection of %r found dead by a read: repeating it", self.pool.name)
        async with self._connection(observer, party) as conn:
            return await run(conn)

    async def write(
        self,
        run: Callable[[Connection], Awaitable[T]],
        observer: PoolObserver | None = None,
        party: Party | None = None,
    ) -> T:
        """`run` a write on a pooled connection, within DB_DEADLINE; never repeated once
        sent (`run` ends its own transaction: see `run_framed`), only while PgBouncer
        refuses it unsent (`_repeating_refusals`)."""
        observer = observer or self.observer
        call = self._repeating_refusals(lambda: self._once(run, observer, party), observer)
        return await self._within_deadline(call, observer)

    async def _repeating_refusals(
        self, attempt: Callable[[], Awaitable[T]], observer: PoolObserver
    ) -> T:
        """`attempt()`, and again, after a pause, each time PgBouncer refuses it because
        its server logins fail (service/pool.py, LOGIN_FAILING), for up to
        DB_LOGIN_RETRY_WINDOW: such a refusal forwards nothing, so a write is as safe to
        send again as a read. It comes at a transaction's first statement (after that
        PgBouncer holds a server for it), and lasts until a login succeeds, at most
        PgBouncer's server_login_retry when the server is up (a RELOAD under traffic
        opens it). A path that is down stays refused and is answered 503 when the
        window is over, or at once when the keeper's probe says it is down.
        """

        def repeating() -> bool:  # unless the keeper's probe says the path is down
            if self.keeper.down:
                return False
            observer.login_refused()
            return True

        window = self.settings.db_login_retry_window
        return await through_login_refusals(attempt, window, repeating)

    async def _once(
        self,
        run: Callable[[Connection], Awaitable[T]],
        observer: PoolObserver,
        party: Party | None = None,
        wait: float | None = None,
    ) -> T:
        async with self._connection(observer, party, wait) as conn:
            return await run(conn)

    def read_cursor(self, conn: Connection) -> AsyncCursor[DictRow]:
        """A cursor for one read: client-side binding unless statements may be prepared."""
        if self.client_binding:
            return AsyncClientCursor(conn, row_factory=dict_row)
        return conn.cursor()

    async def first_row_on(
        self, conn: Connection, query: sql.Composable | str, params: Any = None
    ) -> DictRow | None:
        """One read statement on `conn`, a connection already checked out: its first row
        (`fetch_one` checks one out for the statement)."""
        cur = await self.read_cursor(conn).execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchone()

    async def all_rows_on(
        self, conn: Connection, query: sql.Composable | str, params: Any = None
    ) -> list[DictRow]:
        """One read statement on `conn`, a connection already checked out: all its rows."""
        cur = await self.read_cursor(conn).execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()

    async def fetch_one(self, query: sql.Composable | str, params: Any = None) -> DictRow | None:
        """One read statement on a connection checked out for it: its first row."""
        return await self.read(lambda conn: self.first_row_on(conn, query, params))

    async def fetch_all(self, query: sql.Composable | str, params: Any = None) -> list[DictRow]:
        """One read statement on a connection checked out for it: all its rows."""
        return await self.read(lambda conn: self.all_rows_on(conn, query, params))

    async def transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one explicit transaction with a statement timeout set LOCAL.

        Its connection is tested at checkout (CheckAndSweep), and it is never repeated
        once sent. Pipeline mode sends BEGIN, SET LOCAL and the first statements together.
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

    async def ping(self, within: float) -> None:
        """`SELECT 1` within `within` seconds, connection checkout included.

        Through the same checkout queue as requests, so it waits in turn and is
        counted; it waits for a connection at most half of `within`, so its own
        timeout, not the bound around the whole call, ends a wait that finds none.
        """
        if self.per_request:
            async with asyncio.timeout(within), await self._connect() as conn:
                await conn.execute("SELECT 1")
            return
        null = NullPoolObserver()
        once = functools.partial(self._once, _select_one, null, wait=within / 2)
        call = self._repeating_refusals(once, null)
        try:
            await self._bounded(call, within)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"no answer within {within} s") from exc

    async def _connect(self) -> Connection:
        """A new connection of our own: the naive pattern the benchmark compares against."""
        return await Connection.connect(
            self.settings.conninfo,
            autocommit=True,
            prepare_threshold=None,  # a new connection per request never reuses one
            row_factory=dict_row,
            connect_timeout=max(1, int(self.settings.pool_timeout)),
        )


def _waited(timing: Timing | None, started: float) -> None:
    """A request's wait for a connection that never came, into its Server-Timing."""
    if timing is not None:
        timing.queue += time.perf_counter() - started


async def _select_one(conn: Connection) -> None:
    await conn.execute("SELECT 1")
