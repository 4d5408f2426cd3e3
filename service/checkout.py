"""The queue a request waits in for one of its worker's pooled connections.

psycopg_pool has a queue of its own, but it parks every waiting request on a condition
under `asyncio.wait_for`, which on Python 3.11 wraps each wait in a task of its own. With
the small pools this service runs (4 connections against tens of concurrent requests
per worker) nearly every request waits, and `make bench` measured that queue at about a
tenth of `GET /items/{id}`'s throughput. A semaphore with one slot per pooled connection
queues them for the price of a future each; the pool then nearly always has a connection
ready when a request reaches it.

The same bounds as the pool's own: POOL_TIMEOUT for the whole wait, POOL_MAX_WAITING
for the queue's length, and psycopg_pool's own exceptions, so error handling and
metrics do not change. (The pool's own `max_waiting` is off: see service/pool.py.)

A coalesced batch (service/coalesce.py) queues as one `Party`: its first request is
counted like any other, and its riders are counted, and bounded by POOL_MAX_WAITING,
only while the batch really waits here. A batch that finds a slot free is about to
have a connection, so nobody riding it is refused for pool pressure.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from psycopg_pool import PoolTimeout, TooManyRequests


class Party(Protocol):
    """Requests that wait for one connection together: told when their wait begins
    (to count the others as waiting) and when it ends, however it ends."""

    def start_waiting(self, queue: CheckoutQueue) -> None: ...
    def stop_waiting(self, queue: CheckoutQueue) -> None: ...


class CheckoutQueue:
    """At most `slots` requests hold or take a pooled connection; the others wait in turn."""

    def __init__(self, slots: int, max_waiting: int, timeout: float) -> None:
        self._slots = asyncio.Semaphore(slots)
        self.max_waiting = max_waiting  # 0: no limit, as in psycopg_pool
        self.timeout = timeout  # seconds a request may wait, here and in the pool together
        self.waiting = 0  # requests in the queue now (the pool's waiting gauge adds it)

    def slot(self) -> CheckoutQueue:
        """`async with queue.slot():` holds a slot for the block, waiting at most
        `self.timeout` seconds for one. (The queue is its own context manager: this is
        every request's path, and a generator-based one costs more.)"""
        return self

    def admit(self) -> None:
        """Count one more request waiting, or refuse it (TooManyRequests) when
        POOL_MAX_WAITING already wait. Whoever admits one takes it off `waiting`."""
        if self.max_waiting and self.waiting >= self.max_waiting:
            raise TooManyRequests(f"{self.waiting} requests already waiting")
        self.waiting += 1

    async def acquire(self, within: float, party: Party | None = None) -> None:
        """Take a slot, waiting at most `within` seconds in turn (PoolTimeout), or
        refused at once when POOL_MAX_WAITING already wait (TooManyRequests).
        `release()` gives it back."""
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: returns at once, no wait
            return
        # All taken, or others already waiting: queue, in turn.
        self.admit()
        if party is not None:
            party.start_waiting(self)
        try:
            async with asyncio.timeout(within):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no connection within {within:.2f} s") from None
        finally:
            self.waiting -= 1
            if party is not None:
                party.stop_waiting(self)

    def release(self) -> None:
        self._slots.release()

    async def __aenter__(self) -> None:
        await self.acquire(self.timeout)

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
