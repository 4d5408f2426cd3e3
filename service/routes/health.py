"""Liveness (the process answers) and readiness (the pool can serve a query now)."""

import logging

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import app_settings, database
from service.errors import DatabaseUnreachable, Unavailable, problem
from service.schemas import Health, problem_responses

router = APIRouter(tags=["health"])
logger = logging.getLogger("service.health")


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
    except Exception as exc:
        # Any kind of unavailability, and any other driver error on `SELECT 1`.
        kind = Unavailable.kind_of(exc) or (
            DatabaseUnreachable if isinstance(exc, psycopg.Error) else None
        )
        if kind is None:
            raise
        logger.info("not ready: %s", kind.log)
        return problem(
            503,
            "Service Unavailable",
            "the database is not reachable",
            headers={"Retry-After": str(settings.retry_after)},
        )
    return JSONResponse({"status": "ready"})
