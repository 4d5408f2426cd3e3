"""Whether server-side prepared statements are safe here, decided once at start-up.

Kept apart from the pool's module: gunicorn's master imports this before forking, and
must not import prometheus_client before PROMETHEUS_MULTIPROC_DIR is set.
"""

from __future__ import annotations

import psycopg

from service.settings import DeploymentSettings, Settings


class PreparedStatementsUnsafe(ValueError):
    """PREPARED_STATEMENTS asked for where they would break."""


LIBPQ_WITH_PREPARED_STATEMENT_SUPPORT = 170000  # libpq 17 closes them via the protocol


def prepare_threshold(settings: Settings, deployment: DeploymentSettings) -> int | None:
    """psycopg's prepare_threshold for this deployment: None (never prepare) unless safe.

    Behind PgBouncer in transaction mode a statement prepared on one server connection
    is missing on the next. PgBouncer 1.22+ tracks them (max_prepared_statements > 0),
    provided the client closes them with protocol messages, which needs libpq 17+.
    """
    if not settings.prepared_statements:
        return None
    if deployment.via_pgbouncer:
        if deployment.pgbouncer_max_prepared_statements <= 0:
            raise PreparedStatementsUnsafe(
                "PREPARED_STATEMENTS=true needs PgBouncer >= 1.22 with max_prepared_statements"
                " > 0 (PGBOUNCER_MAX_PREPARED_STATEMENTS is 0): transaction pooling would"
                " lose them between server connections"
            )
        libpq = psycopg.pq.version()
        if libpq < LIBPQ_WITH_PREPARED_STATEMENT_SUPPORT:
            raise PreparedStatementsUnsafe(
                f"PREPARED_STATEMENTS=true behind PgBouncer needs libpq >= 17, this is {libpq}"
            )
    return 5  # psycopg's default: prepare a statement after its fifth run


def describe_prepared_statements(threshold: int | None, deployment: DeploymentSettings) -> str:
    if threshold is None:
        return "prepared statements off (PREPARED_STATEMENTS=false): plain statements only"
    where = "PgBouncer tracks them" if deployment.via_pgbouncer else "direct to PostgreSQL"
    return f"prepared statements on after {threshold} runs ({where})"
