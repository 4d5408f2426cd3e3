"""Liveness (the process answers) and readiness (the pool can serve a query now)."""

import logging

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from service.deps import app_settings, database
from service.errors import DatabaseDown, problem
from service.schemas import Health, problem_responses

router = APIRouter(tags=["health"])
logger = logging.getLogger("service.health")

NOT_READY = (TimeoutError, PoolTimeout, TooManyRequests, PoolClosed, DatabaseDown, psycopg.Error)


@router.get("/healthz")
async def healthz() -> Health:
    """Never touches the database: a database outage must not restart every replica."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=problem_responses(503))
async def readyz(request: Request) -> JSONResponse:
    """200 when a pooled connection answers `SELECT 1` within READINESS_TIMEOUT."""
    db, settings = database(request), app_settings(request)
    try:
        await db.ping(settings.readiness_timeout)
    except NOT_READY as exc:
        logger.info("not ready: %s", type(exc).__name__)
        return problem(
            503,
            "Service Unavailable",
            "the database is not reachable",
            headers={"Retry-After": str(settings.retry_after)},
        )
    return JSONResponse({"status": "ready"})
