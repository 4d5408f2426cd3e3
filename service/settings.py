"""The service's configuration: one class, read from environment variables, validated at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, PostgresDsn, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# libpq's sslmode values; service/rules.py refuses the first three in a deployment.
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class Settings(BaseSettings):
    """Every knob of a replica. Environment variables are the field names in upper case.

    The defaults suit the local stack; README.md lists them all.
    """

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, env_ignore_empty=True, frozen=True
    )

    # Where the pool connects: PgBouncer in transaction mode (never put `options` here:
    # PgBouncer 1.18 disconnects clients that send that startup parameter).
    database_url: PostgresDsn = Field(
        default=PostgresDsn("postgresql://app@127.0.0.1:6432/app"),
        description="libpq URL of PgBouncer (or PostgreSQL) for the application role.",
    )
    db_sslmode: SslMode = Field(
        default="verify-full",
        description="libpq sslmode, unless DATABASE_URL sets one (disable: only to measure TLS).",
    )
    db_sslrootcert: Path | None = Field(
        default=None,
        description="CA certificate the server's must chain to (libpq sslrootcert),"
        " unless DATABASE_URL sets one.",
    )

    # Pool: small, per worker process.
    pool_min: int = Field(default=2, ge=0, description="Connections each worker keeps open.")
    pool_max: int = Field(default=4, ge=1, description="Most connections a worker opens.")
    pool_timeout: float = Field(
        default=2.0, gt=0, description="Seconds a request waits for a pool connection (then 503)."
    )
    pool_max_waiting: int = Field(
        default=128,
        ge=0,
        description="Requests allowed to queue for a connection per worker (0: no limit).",
    )
    pool_open_timeout: float = Field(
        default=10.0, gt=0, description="Seconds the pool may take to fill at start-up."
    )
    pool_max_lifetime: float = Field(
        default=1800.0, gt=0, description="Seconds before a connection is replaced."
    )
    pool_max_idle: float = Field(
        default=300.0, gt=0, description="Seconds an idle connection above pool_min is kept."
    )
    pool_reconnect_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds the pool retries a lost connection before giving it up"
        " (psycopg_pool's reconnect_timeout; the worker recovers either way).",
    )

    prepared_statements: bool = Field(
        default=False,
        description="Server-side prepared statements: only with PgBouncer >= 1.22"
        " (max_prepared_statements > 0) and libpq >= 17, or direct to PostgreSQL.",
    )
    connection_strategy: Literal["pool", "per-request"] = Field(
        default="pool",
        description="`per-request` opens a connection per request: a benchmark baseline only.",
    )
    coalesce_max: int = Field(
        default=64,
        ge=1,
        description="Most requests one statement serves when they queue together (1: off).",
    )
    pool_check_after_idle: float = Field(
        default=1.0,
        ge=0,
        description="A connection idle this long is tested with a round trip before use.",
    )

    # Time bounds on database work.
    statement_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a single statement may run (SET LOCAL / role)."
    )
    db_deadline: float = Field(
        default=8.0,
        gt=0,
        description="Seconds one request's whole database call may take, queueing included.",
    )
    db_login_retry_window: float = Field(
        default=2.0,
        ge=0,
        description="Seconds a call PgBouncer refused unsent (its server logins failing:"
        " server_login_retry) is sent again, within DB_DEADLINE (0: never).",
    )
    retry_after: int = Field(default=1, ge=1, description="Retry-After seconds on a 503.")
    readiness_timeout: float = Field(
        default=1.0, gt=0, description="Seconds /readyz waits for a connection and `SELECT 1`."
    )

    # HTTP.
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request body accepted (then 413)."
    )
    page_limit_max: int = Field(default=100, ge=1, description="Largest `limit` for listings.")

    # Process layout (read by gunicorn's configuration).
    host: str = Field(default="127.0.0.1", description="Address gunicorn binds.")
    port: int = Field(default=8001, ge=1, le=65535, description="Port gunicorn binds.")
    workers: int = Field(default=2, ge=1, description="Uvicorn worker processes per replica.")
    graceful_timeout: int = Field(
        default=20, ge=1, description="Seconds in-flight requests get to finish on SIGTERM."
    )
    # Metrics.
    metrics_enabled: bool = Field(default=True, description="Collect and serve metrics.")
    metrics_port: int = Field(
        default=9101, ge=1, le=65535, description="Port of this replica's /metrics (not public)."
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="Where workers write metric samples; wiped at start (default: a new temp dir).",
    )
    pool_stats_interval: float = Field(
        default=1.0, gt=0, description="Seconds between pool statistics snapshots."
    )

    replica_name: str = Field(default="replica-1", description="Label of this replica.")
    log_level: str = Field(default="info", description="Log level of the service's loggers.")

    # What each request leaves behind (service/context.py, service/logs.py).
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as readable text, or one JSON object each."
    )
    access_log: bool = Field(default=False, description="One log line per request.")
    slow_request_ms: float = Field(
        default=1000.0,
        ge=0,
        description="A request slower than this many ms is always logged (0: never).",
    )
    server_timing: bool = Field(
        default=True,
        description="Server-Timing on every response (false: a benchmark baseline only).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.pool_min > self.pool_max:
            raise ValueError(
                f"POOL_MIN ({self.pool_min}) must not exceed POOL_MAX ({self.pool_max})"
            )
        if self.pool_timeout >= self.db_deadline:
            raise ValueError(
                f"POOL_TIMEOUT ({self.pool_timeout}s) must be below DB_DEADLINE "
                f"({self.db_deadline}s): the deadline covers the wait for a connection"
            )
        if self.statement_timeout >= self.db_deadline:
            raise ValueError(
                f"STATEMENT_TIMEOUT ({self.statement_timeout}s) must be below DB_DEADLINE "
                f"({self.db_deadline}s), so the database cancels a query before we give up on it"
            )
        if self.db_login_retry_window >= self.db_deadline:
            raise ValueError(
                f"DB_LOGIN_RETRY_WINDOW ({self.db_login_retry_window}s) must be below"
                f" DB_DEADLINE ({self.db_deadline}s): the deadline covers the repeats"
            )
        return self

    @property
    def conninfo(self) -> str:
        """The DSN as libpq reads it, with the TLS settings the URL does not name itself."""
        url = str(self.database_url)
        named = conninfo_to_dict(url)
        tls: dict[str, str] = {}
        if "sslmode" not in named:
            tls["sslmode"] = self.db_sslmode
        if "sslrootcert" not in named and self.db_sslrootcert is not None:
            tls["sslrootcert"] = str(self.db_sslrootcert)
        return make_conninfo(url, **tls) if tls else url


class DeploymentSettings(BaseSettings):
    """What a replica knows of the deployment around it, for the connection budget.

    The same variables configure PgBouncer and PostgreSQL in the local stack (which
    extends this class), compose and k8s, so the replica's start-up guard checks the
    numbers those really run with. README.md lists them all.
    """

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, env_ignore_empty=True, frozen=True
    )

    replicas: int = Field(default=2, ge=1, le=1000, description="Replicas declared to run.")
    via_pgbouncer: bool = Field(
        default=True, description="Replicas reach PostgreSQL through PgBouncer (false: direct)."
    )
    pgbouncer_instances: int = Field(default=1, ge=1, description="PgBouncer processes/pods.")
    pgbouncer_max_client_conn: int = Field(
        default=1000, ge=1, description="Client connections PgBouncer accepts."
    )
    pgbouncer_default_pool_size: int = Field(
        default=20, ge=1, description="Server connections per database/user pool."
    )
    pgbouncer_reserve_pool_size: int = Field(
        default=5, ge=0, description="Extra server connections when clients wait over 1 s."
    )
    pgbouncer_max_db_connections: int = Field(
        default=30, ge=0, description="Cap on server connections to the database (0: none)."
    )
    pgbouncer_query_wait_timeout: int = Field(
        default=5, ge=1, description="Seconds a query may queue for a server connection."
    )
    pgbouncer_max_prepared_statements: int = Field(
        default=0,
        ge=0,
        description="PgBouncer's max_prepared_statements (1.22+; 0: it cannot track them).",
    )
    postgres_max_connections: int = Field(default=100, ge=5, description="max_connections.")
    postgres_superuser_reserved: int = Field(
        default=3, ge=1, description="superuser_reserved_connections."
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
