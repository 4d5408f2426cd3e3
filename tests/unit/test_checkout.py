"""The checkout queue: slots taken in turn, bounded waits, the pool's own exceptions."""

from __future__ import annotations

import asyncio
import time

import pytest
from psycopg_pool import PoolTimeout, TooManyRequests

from service.checkout import CheckoutQueue


async def hold(queue: CheckoutQueue, release: asyncio.Event, log: list[int], n: int) -> None:
    async with queue.slot():
        log.append(n)
        await release.wait()


def test_free_slots_are_taken_without_waiting_then_requests_queue_in_turn() -> None:
    async def scenario() -> None:
        queue = CheckoutQueue(slots=2, max_waiting=0, timeout=5)
        release = asyncio.Event()
        log: list[int] = []
        tasks = [asyncio.create_task(hold(queue, release, log, n)) for n in range(5)]
        await asyncio.sleep(0.01)
        assert log == [0, 1]  # two slots: the other three wait
        assert queue.waiting == 3
        release.set()
        await asyncio.gather(*tasks)
        assert log == [0, 1, 2, 3, 4]  # first come, first served
        assert queue.waiting == 0

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once() -> None:
    async def scenario() -> None:
        queue = CheckoutQueue(slots=1, max_waiting=1, timeout=5)
        release = asyncio.Event()
        log: list[int] = []
        held = asyncio.create_task(hold(queue, release, log, 0))
        queued = asyncio.create_task(hold(queue, release, log, 1))
        await asyncio.sleep(0.01)
        assert queue.waiting == 1
        # At once: entering the slot raises on its first step, before it ever yields to
        # the event loop (a clock would say so too, unless the machine is busy).
        entering = queue.slot().__aenter__()
        with pytest.raises(TooManyRequests):
            entering.send(None)
        assert queue.waiting == 1  # the refused request never counted as waiting
        release.set()
        await asyncio.gather(held, queued)
        assert log == [0, 1]

    asyncio.run(scenario())


def test_a_wait_ends_after_the_timeout_and_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        queue = CheckoutQueue(slots=1, max_waiting=0, timeout=0.2)
        release = asyncio.Event()
        held = asyncio.create_task(hold(queue, release, [], 0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            async with queue.slot():
                pass
        # At least the timeout; the upper bound only says it ended, on a busy machine too.
        assert 0.15 < time.monotonic() - started < 5.0
        assert queue.waiting == 0
        # A waiter cancelled (its client went away) gives its place back too.
        cancelled = asyncio.create_task(hold(queue, release, [], 1))
        await asyncio.sleep(0.01)
        assert queue.waiting == 1
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert queue.waiting == 0
        release.set()
        await held
        async with asyncio.timeout(1), queue.slot():  # the slot was not lost
            pass

    asyncio.run(scenario())
