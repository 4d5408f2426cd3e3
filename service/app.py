"""The FastAPI application: one pool per worker process, opened in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import TypedDict, TypeVar

from fastapi import FastAPI

from service.bodylimit import BodySizeLimit
from service.coalesce import Coalescer, Many, One, Runs
from service.context import RequestContext
from service.db import Database
from service.deps import ItemReads, VisitWrites
from service.errors import install_error_handlers
from service.metrics import (
    TALLY,
    HTTPMetrics,
    NullPoolObserver,
    PoolObserver,
    PoolRecorder,
    PrometheusPoolObserver,
    record_settings,
)
from service.openapi import exact_integer_bounds
from service.pool import Connection, PoolHealth, PoolKeeper, pool_name
from service.prepared import describe_prepared_statements, prepare_threshold
from service.routes import health, items, visits
from service.settings import DeploymentSettings, Settings, get_settings

logger = logging.getLogger("service")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class State(TypedDict):
    db: Database
    item_reads: ItemReads
    visit_writes: VisitWrites


def coalesced(
    db: Database,
    statement: str,
    runs: Runs[Connection],
    statements: tuple[One[Connection, K, R], Many[Connection, K, R]],
) -> Coalescer[Connection, K, R]:
    """Requests of one kind that queue for the worker's connections together share one
    statement (service/coalesce.py); `statement` names it in the metrics. Off (every
    request alone) with COALESCE_MAX=1, and with a connection per request."""
    one, many = statements
    return Coalescer(
        runs,
        one,
        many,
        queue=db.queue,
        limit=1 if db.per_request else db.settings.coalesce_max,
        observer=db.observer,
        sizes=db.observer.statement_sizes(statement),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's."""
    settings = settings or get_settings()
    deployment = DeploymentSettings()  # read once: what the deployment allows
    threshold = prepare_threshold(settings, deployment)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        logger.info(
            "pool %r: %s", pool_name(settings), describe_prepared_statements(threshold, deployment)
        )
        keeper = PoolKeeper(settings, threshold)
        await keeper.open()
        metrics = settings.metrics_enabled
        observer: PoolObserver = PrometheusPoolObserver() if metrics else NullPoolObserver()
        db = Database(keeper, settings, observer)
        recorder = PoolRecorder() if metrics else None
        if metrics:
            record_settings(settings, deployment)

        def ticked(health: PoolHealth) -> None:
            if recorder is not None:
                recorder.record(keeper, health, db.waiting, db.abandoned)

        # Always on, metrics or not: the keeper is also what recovers the pool.
        keeping = asyncio.create_task(
            keeper.run(settings.pool_stats_interval, ticked), name="pool-keeper"
        )
        try:
            yield {
                "db": db,
                "item_reads": coalesced(db, "items by id", db.read, items.read_by_id(db)),
                "visit_writes": coalesced(db, "visits", db.write, visits.record_by_item(db)),
            }
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            if metrics:
                TALLY.flush()  # shutting down: what was counted since the last tick counts
            await keeper.close()
            logger.info("pool %r closed", keeper.pool.name)

    app = FastAPI(
        title="pgscale",
        summary="Items and visits on PostgreSQL behind PgBouncer.",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks check for a provider on every request; this
        # service reports to Prometheus (service/metrics.py) and configures none.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    exact_integer_bounds(app)
    install_error_handlers(app)
    # The routers' own routes, not include_router: FastAPI 0.165 wraps each included
    # router in a matcher that walks its routes twice per request (about 70 us of a
    # 0.4 ms GET /items/{id} in one process). Each route already carries its router's
    # prefix, tags, responses and dependencies, so nothing else changes.
    for router in (health.router, items.router, visits.router):
        app.router.routes.extend(router.routes)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.metrics_enabled:
        app.add_middleware(HTTPMetrics)  # it sees every answer, 413s included
    app.add_middleware(  # outermost: every response carries the request's id and timing
        RequestContext,
        timed=settings.server_timing,
        access_log=settings.access_log,
        slow_ms=settings.slow_request_ms,
    )
    return app
