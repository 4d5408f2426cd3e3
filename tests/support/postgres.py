"""PostgreSQL seen from a test: a lock held until released, who waits on it, its log.

A test that needs requests stuck in the database holds a lock here and waits until
PostgreSQL itself reports them blocked on it (`LockHolder.blocked`), instead of
sleeping and hoping they got there; one that needs to know why PostgreSQL ended a
statement reads what its log gained meanwhile (`log_since`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import LiteralString

import psycopg

from infra.localstack import procs

ROW_LOCK: LiteralString = "SELECT 1 FROM items WHERE id = %s FOR UPDATE"
TABLE_LOCK: LiteralString = "LOCK TABLE items IN ACCESS EXCLUSIVE MODE"


class LockHolder:
    """A transaction straight on PostgreSQL that takes a lock and holds it until released."""

    def __init__(
        self, conninfo: str, statement: LiteralString, params: tuple[object, ...] = ()
    ) -> None:
        self.conninfo = conninfo
        self.statement = statement
        self.params = params
        self.pid = 0
        self._taken = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="lock-holder")

    def _hold(self) -> None:
        try:
            with psycopg.connect(self.conninfo) as conn:
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                self.pid = int(row[0]) if row else 0
                conn.execute(self.statement, self.params)
                self._taken.set()
                self._release.wait(60)
                conn.rollback()
        except BaseException as exc:
            self._error = exc
            self._taken.set()

    def __enter__(self) -> LockHolder:
        self._thread.start()
        if not self._taken.wait(10) or self._error is not None:
            raise AssertionError(f"could not take the lock: {self._error}")
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(15)

    def __exit__(self, *exc: object) -> None:
        self.release()

    def blocked(self) -> int:
        """Backends waiting on this lock now, directly or queued behind another waiter."""
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            row = conn.execute(
                """
                WITH RECURSIVE waiting(pid) AS (
                    SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))
                    UNION
                    SELECT a.pid FROM pg_stat_activity a
                    JOIN waiting w ON w.pid = ANY(pg_blocking_pids(a.pid))
                )
                SELECT count(*) FROM waiting
                """,
                (self.pid,),
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_blocked(self, count: int, timeout: float = 15.0) -> bool:
        """Wait until at least `count` backends wait on this lock (False: not in time)."""
        return procs.wait_until(lambda: self.blocked() >= count, timeout, interval=0.05)


@contextlib.contextmanager
def log_since(path: os.PathLike[str]) -> Iterator[Callable[[], str]]:
    """What a log file gained while the block ran (read with the returned function)."""
    with open(path, "rb") as f:
        start = f.seek(0, os.SEEK_END)

    def read() -> str:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    yield read
