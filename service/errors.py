"""Errors as `application/problem+json` (RFC 9457), mapped in one place.

Routes raise; the handlers here decide the status. No body ever carries SQL, SQLSTATE
details, a traceback or a file path: what the client sees is written here, by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.context import current_id, response_headers

logger = logging.getLogger("service.errors")


class ThrottledWarning:
    """A warning logged at most once per `every` seconds, with how many were held back.

    Under overload the same 503 cause repeats thousands of times a second; one line per
    request would cost more CPU than the request did. The metrics count every one.
    """

    def __init__(self, message: str, every: float = 5.0) -> None:
        self.message = message
        self.every = every
        self._last = -every
        self._held = 0

    def __call__(self, path: str) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        logger.warning("%s on %s (%d more since the last report)", self.message, path, held)


PROBLEM_JSON = "application/problem+json"


class Unavailable(Exception):
    """The database cannot serve this request now: 503 with Retry-After.

    Each kind carries what the client reads (`detail`), what the log says (`log`), and
    the library exceptions that mean the same (`causes`: psycopg_pool's and psycopg's,
    raised where they happen and answered here as their kind).
    """

    detail: ClassVar[str] = "the database is unavailable"
    log: ClassVar[str] = "database unavailable"
    causes: ClassVar[tuple[type[Exception], ...]] = ()

    @staticmethod
    def kind_of(exc: BaseException) -> type[Unavailable] | None:
        """The kind of unavailability `exc` is, or None when it is none."""
        if isinstance(exc, Unavailable):
            return type(exc)
        for kind in UNAVAILABLE:
            if isinstance(exc, kind.causes):
                return kind
        return None


class NoConnectionInTime(Unavailable):
    """No pooled connection within POOL_TIMEOUT."""

    detail = "no database connection available in time"
    log = "no pool connection within POOL_TIMEOUT"
    causes = (PoolTimeout,)


class TooManyWaiting(Unavailable):
    """POOL_MAX_WAITING requests already wait for a connection."""

    detail = "too many requests waiting for the database"
    log = "pool queue full (POOL_MAX_WAITING)"
    causes = (TooManyRequests,)


class DeadlineExceeded(Unavailable):
    """The whole database call took longer than DB_DEADLINE."""

    detail = "the database did not answer in time"
    log = "database call exceeded DB_DEADLINE"


class StatementTimedOut(Unavailable):
    """PostgreSQL cancelled a statement at STATEMENT_TIMEOUT."""

    detail = "the database did not answer in time"
    log = "statement cancelled (STATEMENT_TIMEOUT)"
    causes = (psycopg.errors.QueryCanceled,)


class DatabaseDown(Unavailable):
    """The worker's probe finds the database path down: refused without waiting."""

    detail = "the database is unavailable"
    log = "database path down (the worker's probe failed)"


class DatabaseUnreachable(Unavailable):
    """A connection or a query failed on the way to the database."""

    detail = "the database is unavailable"
    log = "database unavailable"
    causes = (psycopg.OperationalError,)


class ShuttingDown(Unavailable):
    """The worker is stopping: its pool is closed."""

    detail = "the service is shutting down"
    log = "the worker is stopping"
    causes = (PoolClosed,)


# Every kind, most specific first: QueryCanceled and psycopg_pool's own exceptions are
# OperationalErrors too, so DatabaseUnreachable comes last.
UNAVAILABLE: tuple[type[Unavailable], ...] = (
    NoConnectionInTime,
    TooManyWaiting,
    DeadlineExceeded,
    StatementTimedOut,
    DatabaseDown,
    ShuttingDown,
    DatabaseUnreachable,
)
_WARNINGS = {kind: ThrottledWarning(kind.log) for kind in UNAVAILABLE}


class NotFound(Exception):
    """The addressed resource does not exist."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class InvalidField(Exception):
    """A request field is well formed but cannot be accepted: 422 naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class MissingReference(InvalidField):
    """A body field points at a row that does not exist."""


class KeyReused(InvalidField):
    """An Idempotency-Key already used for a different request."""


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response; `request_id` names the request (service/context.py), so
    a client's report finds the server's log lines."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    request_id = current_id()
    if request_id is not None:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _unavailable(request: Request, detail: str) -> JSONResponse:
    retry_after = str(request.app.state.settings.retry_after)
    return problem(503, "Service Unavailable", detail, headers={"Retry-After": retry_after})


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def allowed_methods(request: Request) -> str:
    """The `Allow` header for a 405: the methods of every route whose path matches.

    Starlette's router raises the 405 from the first route whose path matched, naming
    that route's methods only (`/items` answered `Allow: POST` though GET exists too).
    RFC 9110 wants every method the resource supports.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the service knows to its HTTP status."""

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input back; we name the field and the
        # rule it broke, never the value (it may be large, binary, or someone's secret).
        errors = [
            {"field": _field_name(err.get("loc", ())), "message": err.get("msg", "invalid")}
            for err in exc.errors()
        ]
        fields = ", ".join(e["field"] for e in errors)
        return problem(422, "Unprocessable Content", f"invalid input: {fields}", errors=errors)

    @app.exception_handler(InvalidField)
    async def invalid_field(request: Request, exc: InvalidField) -> JSONResponse:
        errors = [{"field": exc.field, "message": exc.message}]
        return problem(422, "Unprocessable Content", f"invalid input: {exc.field}", errors=errors)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem(404, "Not Found", f"{exc.what} not found")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            413: "Content Too Large",
        }.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return problem(exc.status_code, title, detail, headers=headers)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        kind = Unavailable.kind_of(exc) or DatabaseUnreachable
        path = request.url.path
        _WARNINGS[kind](f"{path}: {exc}" if kind is DatabaseUnreachable else path)
        return _unavailable(request, kind.detail)

    # Our own kinds, and the library exceptions each kind stands for.
    handled: list[type[Exception]] = [Unavailable]
    handled += [cause for kind in UNAVAILABLE for cause in kind.causes]
    for exception in handled:
        app.add_exception_handler(exception, unavailable)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette sends this one from outside every middleware: the headers come here.
        return problem(
            500, "Internal Server Error", "an unexpected error occurred", response_headers()
        )
