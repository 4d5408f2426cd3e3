"""Each request's id, and where its time went: in the worker's checkout queue, in the
database, in the app.

An operator who sees a slow or refused request needs to find its log lines and to tell
whether it queued for a connection, waited on the database, or spent its time in
Python. So every request gets an id (the caller's `X-Request-ID` when it is a sane
token, else one made here) that every response, problem body and log line about it
carries, and a `Timing` the database layer fills in: seconds waiting for a connection
(`queue`: the checkout queue and the pool, service/db.py `Database._connection`),
seconds holding one (`db`: the statement, PgBouncer's own queue included), and for a
coalesced request the size of the batch whose statement served it (service/coalesce.py).
The rest of the request's time is `app`. Responses carry it as `Server-Timing`, which
browsers' developer tools and the load tests read.

The request's `Timing` lives in a context variable: the database layer reaches it
without every call passing it along, and log records read the id from it
(service/logs.py). A coalesced batch runs in a task of its own with an empty context,
and gives each of its requests their share itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("service.access")

HEADER = b"x-request-id"
# A caller's id is kept when it is a short token of safe characters (it goes into
# headers and log lines as it is), and replaced otherwise.
_SANE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}").fullmatch


class Timing:
    """One request: its id, and the seconds it spent waiting for and holding a
    connection (summed: a read repeated on a dead connection counts both)."""

    __slots__ = ("batch", "db", "id", "queue", "started")

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.started = time.perf_counter()
        self.queue = 0.0
        self.db = 0.0
        self.batch = 0  # requests that shared its statement (0: not a coalesced request)


CURRENT: ContextVar[Timing | None] = ContextVar("pgscale_request", default=None)


def current_id() -> str | None:
    """The id of the request being handled here, if any."""
    timing = CURRENT.get()
    return None if timing is None else timing.id


class RequestIds:
    """Ids for requests that came without a usable one: this process's random prefix
    and a counter, unique across replicas and workers without a system call each."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new prefix: at start, and in each forked worker (gunicorn preloads the app)."""
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


new_id = RequestIds()
os.register_at_fork(after_in_child=new_id.reset)


def request_id_of(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new id."""
    for name, value in scope["headers"]:
        if name == HEADER:
            if _SANE(value):
                return str(value, "ascii")
            break
    return new_id()


def server_timing(timing: Timing, total: float) -> bytes:
    """The Server-Timing value: queue, db and app in milliseconds, and the batch size
    for a coalesced request."""
    queue, db = timing.queue, timing.db
    app = max(total - queue - db, 0.0)
    value = b"queue;dur=%.3f, db;dur=%.3f, app;dur=%.3f" % (queue * 1e3, db * 1e3, app * 1e3)
    if timing.batch:
        value += b", batch;desc=%d" % timing.batch
    return value


def response_headers() -> dict[str, str]:
    """X-Request-ID and Server-Timing for a response sent outside the middleware: the
    500 that Starlette's outermost layer sends, past every user middleware."""
    timing = CURRENT.get()
    if timing is None:
        return {}
    total = time.perf_counter() - timing.started
    return {"X-Request-ID": timing.id, "Server-Timing": server_timing(timing, total).decode()}


class RequestContext:
    """Pure ASGI middleware, outermost: the request's id and Timing, the two headers on
    its response, and its log line (ACCESS_LOG, or a request slower than SLOW_REQUEST_MS).

    `timed=False` leaves Server-Timing out (a benchmark baseline: SERVER_TIMING=false).
    """

    def __init__(
        self, app: ASGIApp, *, timed: bool = True, access_log: bool = False, slow_ms: float = 0
    ) -> None:
        self.app = app
        self.timed = timed
        self.access_log = access_log
        self.slow = slow_ms / 1e3 if slow_ms > 0 else float("inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = Timing(request_id_of(scope))
        started = timing.started
        status = 500
        request_id = timing.id.encode("ascii")
        timed = self.timed

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id))
                if timed:
                    total = time.perf_counter() - started
                    headers.append((b"server-timing", server_timing(timing, total)))
            await send(message)

        token = CURRENT.set(timing)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - started
            if self.access_log or seconds > self.slow:
                self._log(scope, timing, status, seconds)
            CURRENT.reset(token)

    def _log(self, scope: Scope, timing: Timing, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or scope["path"]
        slow = seconds > self.slow
        fields = {
            "route": route,
            "method": scope["method"],
            "status": status,
            "duration_ms": round(seconds * 1e3, 3),
            "queue_ms": round(timing.queue * 1e3, 3),
            "db_ms": round(timing.db * 1e3, 3),
        }
        if timing.batch:
            fields["batch"] = timing.batch
        logger.log(
            logging.WARNING if slow else logging.INFO,
            "%s%s %s %d in %.1f ms (queue %.1f ms, db %.1f ms)",
            "slow request: " if slow else "",
            fields["method"],
            route,
            status,
            fields["duration_ms"],
            fields["queue_ms"],
            fields["db_ms"],
            extra=fields,
        )
