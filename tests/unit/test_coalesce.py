"""Coalescing, step by step: who shares a statement, what each request gets, the bounds.

These drive a Coalescer with the real CheckoutQueue and a stand-in for Database.read
that only takes a slot (the database is in tests/integration/test_coalesce_live.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from psycopg_pool import PoolTimeout, TooManyRequests

from service.checkout import CheckoutQueue
from service.coalesce import Coalescer
from service.context import CURRENT, Timing
from service.metrics import NullPoolObserver

T = TypeVar("T")


class Counting(NullPoolObserver):
    """What a batch reports, per request."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.timeouts = 0
        self.refusals = 0

    def acquired(self, seconds: float) -> None:
        self.waits.append(seconds)

    def timed_out(self) -> None:
        self.timeouts += 1

    def rejected(self) -> None:
        self.refusals += 1


class Harness:
    """A queue of `slots`, and statements that answer `key * 10` and log what ran."""

    def __init__(self, slots: int = 1, limit: int = 64, max_waiting: int = 0, timeout: float = 5):
        self.queue = CheckoutQueue(slots, max_waiting, timeout)
        self.observer = Counting()
        self.calls: list[tuple[str, list[int]]] = []
        self.fail_with: Exception | None = None
        self.coalescer: Coalescer[Any, int, int] = Coalescer(
            self.runs,
            self.one,
            self.many,
            queue=self.queue,
            limit=limit,
            observer=self.observer,
        )

    async def runs(
        self, run: Callable[[Any], Awaitable[T]], observer: Any = None, party: Any = None
    ) -> T:
        """What Database.read does around `run`, minus the database."""
        observer = observer or self.observer
        try:
            await self.queue.acquire(self.queue.timeout, party)
        except PoolTimeout:
            observer.timed_out()
            raise
        except TooManyRequests:
            observer.rejected()
            raise
        try:
            observer.acquired(0.0)
            return await run("connection")
        finally:
            self.queue.release()

    async def behind_a_busy_connection(self, keys: list[int]) -> list[asyncio.Task[int]]:
        """Hold the only slot, start a load per key, and let them queue behind it;
        `free()` lets them through."""
        self._release = asyncio.Event()
        self._holder = asyncio.create_task(held(self.queue, self._release))
        await asyncio.sleep(0)
        loads = [asyncio.create_task(self.coalescer.load(k)) for k in keys]
        await asyncio.sleep(0.01)
        return loads

    async def free(self) -> None:
        self._release.set()
        await self._holder

    async def one(self, conn: Any, key: int) -> int:
        return (await self.many(conn, [key], "one"))[0]

    async def many(self, conn: Any, keys: list[int], name: str = "many") -> list[int]:
        self.calls.append((name, list(keys)))
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        return [key * 10 for key in keys]


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def held(queue: CheckoutQueue, release: asyncio.Event) -> None:
    async with queue.slot():
        await release.wait()


def test_a_request_with_a_connection_free_runs_its_own_statement() -> None:
    async def scenario() -> None:
        h = Harness(slots=2)
        assert await h.coalescer.load(3) == 30
        assert await h.coalescer.load(4) == 40
        assert h.calls == [("one", [3]), ("one", [4])]

    run(scenario)


def test_requests_that_queue_together_share_one_statement_and_get_their_own_answers() -> None:
    async def scenario() -> None:
        h = Harness(slots=1)
        loads = await h.behind_a_busy_connection([5, 2, 5, 9])
        assert h.queue.waiting == 4  # the batch in the queue, and the three riding it
        await h.free()
        assert await asyncio.gather(*loads) == [50, 20, 50, 90]
        assert h.calls == [("many", [5, 2, 5, 9])]  # arrival order, repeats kept
        assert h.queue.waiting == 0
        assert len(h.observer.waits) == 4  # each request's own wait, not the batch's

    run(scenario)


def test_newcomers_after_the_batch_got_its_connection_form_the_next_one() -> None:
    async def scenario() -> None:
        h = Harness(slots=1)
        first = await h.behind_a_busy_connection([1, 2])
        await h.free()  # the batch takes the slot: it is closed from here on
        second = [asyncio.create_task(h.coalescer.load(k)) for k in (3, 4)]
        assert await asyncio.gather(*first, *second) == [10, 20, 30, 40]
        assert h.calls == [("many", [1, 2]), ("many", [3, 4])]

    run(scenario)


def test_coalesce_max_caps_a_batch_and_one_turns_coalescing_off() -> None:
    async def scenario(limit: int) -> list[tuple[str, list[int]]]:
        h = Harness(slots=1, limit=limit)
        loads = await h.behind_a_busy_connection(list(range(7)))
        await h.free()
        assert await asyncio.gather(*loads) == [k * 10 for k in range(7)]
        return h.calls

    calls = asyncio.run(scenario(3))
    assert calls == [("many", [0, 1, 2]), ("many", [3, 4, 5]), ("one", [6])]
    assert asyncio.run(scenario(1)) == [("one", [k]) for k in range(7)]


def test_riders_count_as_waiting_and_are_refused_at_once_when_the_queue_is_full() -> None:
    async def scenario() -> None:
        h = Harness(slots=1, max_waiting=3)
        loads = await h.behind_a_busy_connection([0, 1, 2])
        assert h.queue.waiting == 3
        with pytest.raises(TooManyRequests):
            await h.coalescer.load(99)
        assert h.observer.refusals == 1
        await h.free()
        assert await asyncio.gather(*loads) == [0, 10, 20]

    run(scenario)


def test_a_burst_in_one_turn_is_not_refused_while_a_connection_is_free() -> None:
    """Eight requests landing in one turn of the event loop on two idle connections:
    every rider joins a batch that has not queued, so none is refused (POOL_MAX_WAITING
    is 2), and nobody is left counted as waiting."""

    async def scenario() -> None:
        h = Harness(slots=2, max_waiting=2)
        results = await asyncio.gather(
            *(h.coalescer.load(k) for k in range(8)), return_exceptions=True
        )
        assert results == [k * 10 for k in range(8)]
        assert h.observer.refusals == 0
        assert h.queue.waiting == 0

    run(scenario)


def test_control_the_same_burst_behind_busy_connections_is_refused_past_the_limit() -> None:
    """The bound still holds where it should: with both connections busy the batch
    queues, and riders past POOL_MAX_WAITING are refused at once."""

    async def scenario() -> None:
        h = Harness(slots=2, max_waiting=2)
        release = asyncio.Event()
        holders = [asyncio.create_task(held(h.queue, release)) for _ in range(2)]
        await asyncio.sleep(0)  # both slots taken
        first = asyncio.create_task(h.coalescer.load(0))
        while h.queue.waiting == 0:  # noqa: ASYNC110 (the batch has queued: no event says so)
            await asyncio.sleep(0)
        riders = [asyncio.create_task(h.coalescer.load(k)) for k in range(1, 8)]
        while sum(t.done() for t in riders) < 6:  # noqa: ASYNC110 (refused at once, in turn)
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(first, *riders, return_exceptions=True)
        refused = [r for r in results if isinstance(r, TooManyRequests)]
        assert len(refused) == h.observer.refusals == 6  # the leader and one rider fill it
        assert [r for r in results if not isinstance(r, TooManyRequests)] == [0, 10]
        await asyncio.gather(*holders)
        assert h.queue.waiting == 0

    run(scenario)


def test_a_batch_that_waits_too_long_times_out_every_request_in_it() -> None:
    async def scenario() -> None:
        h = Harness(slots=1, timeout=0.1)
        loads = await h.behind_a_busy_connection([0, 1, 2])
        results = await asyncio.gather(*loads, return_exceptions=True)
        assert [type(r) for r in results] == [PoolTimeout] * 3
        assert h.observer.timeouts == 3  # counted per request
        assert h.queue.waiting == 0  # nobody is left counted as waiting
        await h.free()
        assert await h.coalescer.load(7) == 70  # and the next request is served

    run(scenario)


def test_a_failed_statement_fails_every_request_of_its_batch_and_nothing_else() -> None:
    async def scenario() -> None:
        h = Harness(slots=1)
        h.fail_with = ValueError("the statement failed")
        loads = await h.behind_a_busy_connection([0, 1, 2])
        await h.free()
        results = await asyncio.gather(*loads, return_exceptions=True)
        assert [str(r) for r in results] == ["the statement failed"] * 3
        h.fail_with = None
        assert await h.coalescer.load(4) == 40

    run(scenario)


def test_a_request_that_gives_up_leaves_its_batch_served() -> None:
    async def scenario() -> None:
        h = Harness(slots=1)
        loads = await h.behind_a_busy_connection([0, 1, 2])
        loads[0].cancel()  # its client went away (it opened the batch, even)
        await h.free()
        results = await asyncio.gather(*loads, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [10, 20]
        assert h.queue.waiting == 0

    run(scenario)


def test_each_request_of_a_batch_gets_its_own_wait_and_the_shared_statement() -> None:
    """Server-Timing's parts: a rider waited from its own arrival, every request is
    told the batch's size, and none of it lands on a request outside the batch."""

    async def timed_load(h: Harness, key: int) -> Timing:
        timing = Timing(f"r{key}")
        CURRENT.set(timing)  # what service/context.py's middleware does, per request task
        await h.coalescer.load(key)
        return timing

    async def scenario() -> None:
        h = Harness(slots=1)
        outsider = Timing("outside")
        CURRENT.set(outsider)
        release = asyncio.Event()
        holder = asyncio.create_task(held(h.queue, release))
        await asyncio.sleep(0)
        loads = [asyncio.create_task(timed_load(h, k)) for k in (1, 2, 3)]
        await asyncio.sleep(0.01)
        release.set()
        await holder
        timings = await asyncio.gather(*loads)
        assert [t.batch for t in timings] == [3, 3, 3]
        assert all(t.queue >= 0.01 for t in timings)
        assert len({t.db for t in timings}) == 1
        assert (outsider.queue, outsider.db, outsider.batch) == (0.0, 0.0, 0)

    run(scenario)


def test_a_batch_that_gets_no_connection_says_how_long_each_request_waited() -> None:
    async def timed_load(h: Harness, key: int) -> Timing:
        timing = Timing(f"r{key}")
        CURRENT.set(timing)
        with pytest.raises(PoolTimeout):
            await h.coalescer.load(key)
        return timing

    async def scenario() -> None:
        h = Harness(slots=1, timeout=0.05)
        release = asyncio.Event()
        holder = asyncio.create_task(held(h.queue, release))
        await asyncio.sleep(0)
        timings = await asyncio.gather(*(timed_load(h, k) for k in (1, 2)))
        release.set()
        await holder
        assert [t.batch for t in timings] == [2, 2]
        assert all(t.queue >= 0.04 for t in timings), [t.queue for t in timings]
        assert all(t.db == 0 for t in timings)

    run(scenario)
