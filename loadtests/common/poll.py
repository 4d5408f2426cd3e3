"""One background poller: a reading every few seconds, in a thread, while a block runs.

The benchmark watches its replicas' worker RSS during each run and the sweep watches
the pools' waiters and refused connections during each cell; both want the same thing,
a plain OS thread that reads something on an interval until the load is over, then
every reading to take the peak of.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Self, TypeVar

T = TypeVar("T")


class Poll(Generic[T]):
    """Calls `read` every `interval` seconds in a daemon thread while the `with` block
    runs (the first reading one interval in) and keeps each result in `readings`.

    `read` runs in that thread: an exception in it ends the polling (and is printed by
    threading's excepthook), so a reader that may fail should catch what it expects.
    Leaving the block stops the thread and waits for a reading under way.
    """

    def __init__(self, read: Callable[[], T], interval: float) -> None:
        self.read = read
        self.interval = interval
        self.readings: list[T] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.readings.append(self.read())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
