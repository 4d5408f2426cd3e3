"""Requests that would queue for a connection anyway share one statement.

Under load every request of a worker queues for one of its few pooled connections
(service/checkout.py), and then most of what it costs is its own round trip: the
worker, PgBouncer and PostgreSQL each woken for one short statement, on cores they
all share. `make bench` put that at about two thirds of GET /items/{id}'s CPU. So a
request of a coalesced kind (an item read by id; a visit without an Idempotency-Key)
that arrives while a batch of its kind is waiting for a connection joins that batch,
and when the batch gets its connection, one statement serves every request in it,
each getting its own answer back. A request that finds no batch waiting opens one;
with a connection free, that batch takes it at once, most often holding just that
request, which then runs the plain one-row statement. So coalescing adds no wait, and
changes nothing a client can see but the timing.

The bounds stay per request. A request riding a batch counts as waiting while the
batch waits in the checkout queue, so POOL_MAX_WAITING refuses it at once when the
queue is full; a rider of a batch that has not queued (it found a connection free, or
has not reached the queue yet) waits for nothing but its turn in the event loop, and is
never refused for pool pressure (COALESCE_MAX bounds the batch). The batch waits at most
POOL_TIMEOUT for its connection and runs within DB_DEADLINE, both counted from its
first request; a batch's failure is every one of its requests' failure (the same
503). The pool's metrics count requests, not batches. COALESCE_MAX caps a batch; 1
turns coalescing off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextvars import Context
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from psycopg_pool import PoolClosed, TooManyRequests

from service.checkout import CheckoutQueue
from service.context import CURRENT, Timing
from service.metrics import NullPoolObserver, PoolObserver, TalliedHistogram

if TYPE_CHECKING:
    from service.checkout import Party

C = TypeVar("C")  # the connection a statement runs on (service.pool.Connection in the app)
C_co = TypeVar("C_co", covariant=True)
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
T = TypeVar("T")


class Batch(Generic[K, R]):
    """Requests gathered for one statement: each one's key, and the future it waits on."""

    def __init__(self, queue: CheckoutQueue, observer: PoolObserver) -> None:
        self._queue = queue
        self.keys: list[K] = []  # one per request, in arrival order
        self._futures: list[asyncio.Future[R]] = []
        self._arrived: list[float] = []
        self._timings: list[Timing | None] = []  # each request's (service/context.py)
        self._held: float | None = None  # when the batch got its connection
        self._timings_given = False
        self._riders = 0  # requests after the first
        self._counted = 0  # riders counted in the queue's `waiting` now
        self.in_queue = False  # waiting in the checkout queue now
        self.closed = False
        self._each = observer
        self.observer = _EveryRequest(self, observer)  # for the batch's database call

    def __len__(self) -> int:
        return len(self.keys)

    def start_waiting(self, queue: CheckoutQueue) -> None:
        """Party: the batch starts waiting for a slot; its riders wait with it."""
        self.in_queue = True
        queue.waiting += self._riders  # already in: counted, not refused
        self._counted = self._riders

    def stop_waiting(self, queue: CheckoutQueue) -> None:
        """Party: the batch has a slot (or gave up): nobody in it waits in the queue."""
        self.in_queue = False
        queue.waiting -= self._counted
        self._counted = 0

    def counted_rider(self) -> None:
        """A rider admitted into the queue's count while the batch waits there."""
        self._counted += 1

    def join(self, key: K, *, rider: bool) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.keys.append(key)
        self._futures.append(future)
        self._arrived.append(time.perf_counter())
        self._timings.append(CURRENT.get())
        self._riders += rider
        return future

    def take(self) -> list[K]:
        """Close the batch to newcomers: its connection is in hand. The key of each of
        its requests, in order (the same list however often it is asked)."""
        if not self.closed:
            self._close()
            now = self._held = time.perf_counter()
            for arrived, timing in zip(self._arrived, self._timings, strict=True):
                self._each.acquired(now - arrived)
                if timing is not None:
                    timing.queue += now - arrived
        return self.keys

    def resolve(self, answers: Sequence[R]) -> None:
        """Give each request its answer: `answers` follows `keys`."""
        if len(answers) != len(self._futures):
            self.fail(RuntimeError(f"{len(answers)} answers for {len(self._futures)} requests"))
            return
        self._timed()
        for future, answer in zip(self._futures, answers, strict=True):
            if not future.done():  # done: the request was cancelled (client gone)
                future.set_result(answer)

    def _timed(self) -> None:
        """Each request's Server-Timing: the statement's time, and how many shared it;
        for a batch that never got a connection, how long each waited for one. Once."""
        if self._timings_given:
            return
        self._timings_given = True
        now = time.perf_counter()
        size = len(self.keys)
        for arrived, timing in zip(self._arrived, self._timings, strict=True):
            if timing is None:
                continue
            if self._held is None:
                timing.queue += now - arrived
            else:
                timing.db += now - self._held
            timing.batch = size

    def fail(self, exc: BaseException) -> None:
        """Every request of the batch fails as the batch did."""
        self._timed()
        self._close()
        for future in self._futures:
            if not future.done():
                future.set_exception(exc)

    def _close(self) -> None:
        self.closed = True


class _EveryRequest:
    """The batch's own database call, reported once per request it carries.

    Its checkout wait is reported by `Batch.take`, per request from its arrival; the
    call's outcomes (timed out, refused, past the deadline) count once per request.
    """

    def __init__(self, batch: Batch[K, R], each: PoolObserver) -> None:
        self.batch: Batch[K, R] = batch
        self.each = each

    def acquired(self, seconds: float) -> None:
        pass  # Batch.take reports each request's own wait

    def timed_out(self) -> None:
        for _ in range(len(self.batch)):
            self.each.timed_out()

    def rejected(self) -> None:
        for _ in range(len(self.batch)):
            self.each.rejected()

    def deadline_exceeded(self) -> None:
        for _ in range(len(self.batch)):
            self.each.deadline_exceeded()

    def unavailable(self) -> None:
        for _ in range(len(self.batch)):
            self.each.unavailable()

    def login_refused(self) -> None:
        self.each.login_refused()  # one call, sent again: counted once

    def statement_sizes(self, statement: str) -> TalliedHistogram | None:
        return self.each.statement_sizes(statement)


One = Callable[[C, K], Awaitable[R]]
Many = Callable[[C, list[K]], Awaitable[Sequence[R]]]


class Runs(Protocol[C_co]):
    """How a database call runs on a pooled connection: `Database.read` (repeated once
    on a dead connection) or `Database.write` (never repeated once sent)."""

    def __call__(
        self,
        run: Callable[[C_co], Awaitable[T]],
        observer: PoolObserver | None = None,
        party: Party | None = None,
        /,
    ) -> Awaitable[T]: ...


class Coalescer(Generic[C, K, R]):
    """One kind of request: served one by one, or in batches when several queue together.

    `one(conn, key)` answers one request, `many(conn, keys)` several (one answer per
    key, in order), each on the connection `runs` checked out. A batch stays open to
    newcomers until it has its connection: at once when one is free (then it holds the
    requests that arrived in the same turn of the event loop, most often one, which gets
    `one`), or when one frees up, after everything that queued meanwhile joined it.
    """

    def __init__(
        self,
        runs: Runs[C],
        one: One[C, K, R],
        many: Many[C, K, R],
        *,
        queue: CheckoutQueue,
        limit: int,
        observer: PoolObserver | None = None,
        sizes: TalliedHistogram | None = None,
    ) -> None:
        self.runs = runs
        self.one = one
        self.many = many
        self.queue = queue
        self.limit = limit  # requests per statement at most; 1: never coalesce
        self.observer = observer or NullPoolObserver()
        self.sizes = sizes  # requests per statement, single ones included (metrics)
        self._open: Batch[K, R] | None = None  # the batch newcomers join, while it waits
        self._serving: set[asyncio.Task[None]] = set()  # held so they are not collected

    async def load(self, key: K) -> R:
        """The answer for `key`, alone or as part of a batch."""
        if self.limit <= 1:
            if self.sizes is not None:
                self.sizes.observe(1)
            return await self.runs(lambda conn: self.one(conn, key))
        batch = self._open
        if batch is not None and not batch.closed and len(batch) < self.limit:
            if batch.in_queue:  # the batch waits for a connection, and so will this one
                try:
                    self.queue.admit()
                except TooManyRequests:
                    self.observer.rejected()
                    raise
                batch.counted_rider()
            return await batch.join(key, rider=True)
        batch = self._open = Batch(self.queue, self.observer)
        future = batch.join(key, rider=False)  # the queue counts it if the batch queues
        # An empty context: the batch serves many requests, it is none of them.
        task = asyncio.get_running_loop().create_task(self._serve(batch), context=Context())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        return await future

    async def _serve(self, batch: Batch[K, R]) -> None:
        async def run(conn: C) -> Sequence[R]:
            keys = batch.take()
            if len(keys) == 1:
                return [await self.one(conn, keys[0])]
            return await self.many(conn, keys)

        try:
            answers = await self.runs(run, batch.observer, batch)
        except Exception as exc:
            batch.fail(exc)
        except BaseException:  # cancelled: the worker is stopping; its requests get a 503
            batch.fail(PoolClosed("the worker is stopping"))
            raise
        else:
            batch.resolve(answers)
        finally:
            if self._open is batch:
                self._open = None
            if self.sizes is not None:
                self.sizes.observe(len(batch))
