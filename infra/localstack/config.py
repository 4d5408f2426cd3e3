"""The local stack's knobs: environment variables with defaults, listed in README.md.

The service's own settings (POOL_MIN, STATEMENT_TIMEOUT, ...) live in
service/settings.py; the stack passes them through to every replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from infra.localstack import procs
from service.settings import DeploymentSettings

REPO = Path(__file__).resolve().parent.parent.parent


class StackSettings(DeploymentSettings):
    """Shape, ports and PgBouncer/PostgreSQL limits of the local stack."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, env_ignore_empty=True, frozen=True
    )

    stack_dir: Path = Field(default=REPO / ".stack", description="Data, configs, logs, pids.")

    # Shape: REPLICAS and the PgBouncer/PostgreSQL limits are DeploymentSettings; WORKERS,
    # POOL_MIN, POOL_MAX and the rest are the service's own settings.
    seed_items: int = Field(default=1000, ge=0, description="Items created by `make up`.")

    # Ports (all on 127.0.0.1).
    lb_port: int = Field(default=8000, description="haproxy, the public entry point.")
    replica_base_port: int = Field(default=8001, description="Replica i listens on base + i - 1.")
    metrics_base_port: int = Field(
        default=9101, description="Replica i serves /metrics on base + i - 1."
    )
    pgbouncer_port: int = Field(
        default=6432, description="PgBouncer instance i listens on this port + i - 1."
    )
    postgres_port: int = Field(default=5432, description="PostgreSQL.")
    prometheus_port: int = Field(default=9090, description="Prometheus.")
    pgbouncer_exporter_port: int = Field(default=9127, description="The PgBouncer exporter.")
    postgres_exporter_port: int = Field(default=9187, description="The PostgreSQL exporter.")
    process_exporter_port: int = Field(
        default=9256, description="The process exporter (PgBouncer CPU per instance)."
    )

    db_tls: bool = Field(
        default=True,
        description="TLS on every database hop (false: plain TCP, only to measure its cost).",
    )

    pgbouncer_server_login_retry: int = Field(
        default=1, ge=1, description="Seconds before retrying a failed server login."
    )

    def replica_port(self, index: int) -> int:
        """The port of replica `index` (1-based)."""
        return self.replica_base_port + index - 1

    def metrics_port(self, index: int) -> int:
        """The metrics port of replica `index` (1-based)."""
        return self.metrics_base_port + index - 1

    def pgbouncer_instance_port(self, index: int) -> int:
        """The port of PgBouncer instance `index` (1-based)."""
        return self.pgbouncer_port + index - 1


def private_settings(
    root: Path,
    *,
    most_replicas: int = 16,
    most_pgbouncers: int = 4,
    spare: int = 0,
    **overrides: Any,
) -> tuple[StackSettings, list[int]]:
    """Settings for a throwaway stack in `root` on free ports, and `spare` ports more.

    The sweep, the fault suite and the tests run stacks beside a running `make up`.
    All ports come from one block below the ephemeral range, where a load generator's
    client sockets cannot take them between choosing and binding.
    """
    if overrides.get("pgbouncer_instances", 1) > most_pgbouncers:
        raise ValueError(f"a private stack has ports for {most_pgbouncers} PgBouncers at most")
    fixed = 6 + most_pgbouncers
    base = procs.free_port_block(fixed + spare + 2 * most_replicas)
    settings = StackSettings(
        stack_dir=root,
        lb_port=base,
        postgres_port=base + 1,
        prometheus_port=base + 2,
        pgbouncer_exporter_port=base + 3,
        postgres_exporter_port=base + 4,
        process_exporter_port=base + 5,
        pgbouncer_port=base + 6,  # instance i on base + 6 + i - 1
        replica_base_port=base + fixed + spare,
        metrics_base_port=base + fixed + spare + most_replicas,
        **overrides,
    )
    return settings, [base + fixed + i for i in range(spare)]
