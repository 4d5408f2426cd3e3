"""What a cell reads: the pools' metrics while it runs, the sampler's and Locust's CSVs after."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import httpx

from loadtests.common.prom import Scrape
from loadtests.common.sampling import by_replica, parse_counts
from loadtests.sweep.plan import Mode


def pool_pressure(http: httpx.Client, urls: list[str]) -> tuple[int, int]:
    """(requests waiting in the pools, pool connections refused so far), summed over the
    replicas' metrics ports that answer.

    A refused connection is PostgreSQL (or PgBouncer) turning down a new pool connection,
    "sorry, too many clients already" when the replicas go straight to PostgreSQL.
    """
    waiting = errors = 0
    for url in urls:
        with contextlib.suppress(httpx.HTTPError):
            metrics = Scrape.get(url, http)
            waiting += int(metrics.total("pgscale_pool_requests_waiting"))
            errors += int(metrics.total("pgscale_pool_connection_errors", "_total"))
    return waiting, errors


def replica_sum(cell: str | None) -> int:
    """`replica-1=8;replica-2=8` -> 16 (other application names ignored)."""
    return sum(n for name, n in parse_counts(cell).items() if name.startswith("replica-"))


def peaks(samples_csv: Path, mode: Mode) -> dict[str, Any]:
    """Peak connection counts over the run, from the sampler's CSV, and how the clients
    split over the PgBouncer instances when they peaked (each instance's server peak)."""
    clients = servers = backends = shed = 0
    split = ""
    instance_servers: dict[str, int] = {}
    column = "pgb_clients_by_replica" if mode is Mode.PGBOUNCER else "pg_backends_by_replica"
    with samples_csv.open() as f:
        for row in csv.DictReader(f):
            shed = max(shed, int(row.get("saturated_503") or 0))
            now = replica_sum(row.get(column))
            if now > clients:
                clients, split = now, row.get("pgb_clients_by_instance") or ""
            servers = max(servers, int(row.get("pgb_servers") or 0))
            backends = max(backends, int(row.get("pg_client_backends") or 0))
            for name, n in parse_counts(row.get("pgb_servers_by_instance")).items():
                instance_servers[name] = max(n, instance_servers.get(name, 0))
    return {
        "clients": clients,
        "servers": servers,
        "backends": backends,
        "shed": shed,
        "clients_by_instance": split,
        "servers_by_instance": by_replica(instance_servers),
    }


def locust_totals(stats_csv: Path) -> dict[str, float]:
    """The Aggregated row of Locust's stats CSV: requests, failures, rate, percentiles."""
    with stats_csv.open() as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return {
                    "requests": float(row["Request Count"]),
                    "failures": float(row["Failure Count"]),
                    "rps": float(row["Requests/s"]),
                    "p50": float(row["50%"]),
                    "p95": float(row["95%"]),
                    "p99": float(row["99%"]),
                }
    raise ValueError(f"no Aggregated row in {stats_csv}")
