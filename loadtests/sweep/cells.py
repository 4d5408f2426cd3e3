"""One cell's prediction, measurement and verdict: does it agree with the budget?"""

from __future__ import annotations

from dataclasses import dataclass

from loadtests.sweep.plan import CellKey, Mode
from service.budget import Budget


@dataclass
class Cell:
    """One cell's prediction, measurement and verdict (the fields are the report's
    columns, in this order: cells.csv and summary.json)."""

    mode: Mode
    workers: int
    replicas: int
    pool_max: int
    predicted_clients: int  # R x W x POOL_MAX, from service.budget
    budget_fits: bool
    budget_server_at_peak: int
    measured_clients: int  # peak app connections into PgBouncer (direct: into PostgreSQL)
    pgbouncer_servers: int  # peak server connections PgBouncer held
    postgres_backends: int  # peak client backends PostgreSQL served
    postgres_max_connections: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: int  # unexpected answers and errors
    shed_503: int  # deliberate 503s with Retry-After (pool pressure)
    pool_waiters: int  # peak requests queued in the app pools, summed over workers
    connection_errors: int  # pool connections refused (direct: "too many clients")
    verdict: str
    as_predicted: bool

    @property
    def key(self) -> CellKey:
        return CellKey(self.mode, self.workers, self.replicas)


def judge(cell: Cell, budget: Budget) -> tuple[str, bool]:
    """Does the measurement agree with the budget's prediction?"""
    if cell.mode is Mode.PGBOUNCER:
        server_ceiling = budget.server_at_peak
        ok = cell.measured_clients == cell.predicted_clients and (
            cell.pgbouncer_servers <= server_ceiling
        )
        if ok:
            return (
                f"clients {cell.measured_clients} = R x W x P; PgBouncer held"
                f" {cell.pgbouncer_servers} <= {server_ceiling} server connections"
            ), True
        return (
            f"measured {cell.measured_clients} clients vs {cell.predicted_clients} predicted,"
            f" {cell.pgbouncer_servers} server connections vs ceiling {server_ceiling}"
        ), False
    # Without PgBouncer, overflowing means PostgreSQL refuses pool connections: the pools
    # stay short of their size, requests queue for what there is (or fail).
    refused = cell.connection_errors > 0 or cell.measured_clients < cell.predicted_clients
    if budget.ok and not refused:
        return "fits, and every pool reached its size", True
    if not budget.ok and refused:
        return (
            f"over budget ({cell.predicted_clients} > {budget.server_available} available):"
            f" PostgreSQL refused {cell.connection_errors} connections, pools reached"
            f" {cell.measured_clients}; {cell.failures} failures, {cell.shed_503} shed 503s,"
            f" p99 {cell.p99_ms:.0f} ms"
        ), True
    if budget.ok:
        return f"fits, yet {cell.connection_errors} connections were refused", False
    return "over budget, yet every connection was accepted", False
