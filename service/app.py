"""The FastAPI application: one pool per worker process, opened in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI
from psycopg.rows import DictRow

from service.bodylimit import BodySizeLimit
from service.coalesce import Coalescer
from service.db import Database, create_pool, open_pool
from service.errors import install_error_handlers
from service.metrics import (
    HTTPMetrics,
    NullPoolObserver,
    PoolObserver,
    PrometheusPoolObserver,
    publish_pool_stats,
)
from service.openapi import exact_integer_bounds
from service.routes import health, items, visits
from service.settings import Settings, get_settings

logger = logging.getLogger("service")


class State(TypedDict):
    db: Database
    item_reads: Coalescer[int, DictRow | None]
    visit_writes: Coalescer[int, DictRow | None]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        pool = create_pool(settings)
        await open_pool(pool, settings)
        metrics = settings.metrics_enabled
        observer: PoolObserver = PrometheusPoolObserver() if metrics else NullPoolObserver()
        db = Database(pool, settings, observer)
        publisher = (
            asyncio.create_task(
                publish_pool_stats(pool, settings.pool_stats_interval, lambda: db.queue.waiting),
                name="pool-stats",
            )
            if metrics
            else None
        )
        try:
            yield {
                "db": db,
                "item_reads": items.items_by_id(db),
                "visit_writes": visits.visits_recorded(db),
            }
        finally:
            if publisher is not None:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
            await pool.close()
            logger.info("pool %r closed", pool.name)

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
        app.add_middleware(HTTPMetrics)  # outermost: it sees every answer, 413s included
    return app
