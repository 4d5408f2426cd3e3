"""One cell's prediction, measurement and verdict: does it agree with the budget?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtests.common.sampling import parse_counts
from loadtests.sweep.plan import CellKey, Mode
from service.budget import Budget


@dataclass
class Cell:
    """One cell's prediction, measurement and verdict (the fields are the report's
    columns, in this order: cells.csv and summary.json)."""

    mode: Mode
    workers: int
    replicas: int
    pgbouncer_instances: int
    pool_max: int
    predicted_clients: int  # R x W x POOL_MAX, from service.budget
    budget_fits: bool
    budget_server_at_peak: int
    measured_clients: int  # peak app connections into PgBouncer (direct: into PostgreSQL)
    pgbouncer_servers: int  # peak server connections PgBouncer held (all instances)
    clients_by_instance: str  # `pgbouncer-1=8;pgbouncer-2=8` when the clients peaked
    servers_by_instance: str  # the same for server connections, each instance's peak
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
    # `replica-1=25.1,14.9,8.0,6.0;...`: each worker's mean requests in flight, largest
    # first (probes.in_flight_by_worker): how evenly the workers shared the users.
    in_flight_by_worker: str
    # `queue=3.8/23;db=3.8/15;app=4.3/16;locust=25/62`: GET /items/{id}'s Server-Timing
    # parts and Locust's latency, p50/p99 ms (probes.read_server_timing): where a read's
    # time went, inside the service and outside it.
    read_server_timing: str
    # CPU ms per request of the load generator (Locust, one process) and of haproxy,
    # over the cell's steady part (probes.ms_per_request): what the rig itself costs on
    # the cores it shares with the stack, which the capacity model takes as given.
    locust_ms_per_request: float
    haproxy_ms_per_request: float
    # CPU busy on the machine, in cores, with the stack at rest just before the load:
    # other work sharing the machine, which the cell's rates and latencies then include.
    background_cores: float
    verdict: str
    as_predicted: bool

    @property
    def key(self) -> CellKey:
        return CellKey(self.mode, self.workers, self.replicas, self.pgbouncer_instances)


def split_bounds(clients: int, instances: int) -> tuple[int, int]:
    """Where each instance's share of `clients` falls, nearly always (mean +- 3 sigma).

    libpq's load_balance_hosts=random picks an instance for each connection on its own,
    so one instance's share is binomial: clients/n on average, sqrt(c x 1/n x (1 - 1/n))
    either way. Few connections spread unevenly, and that is the prediction too.
    """
    if instances == 1:
        return clients, clients
    share = 1 / instances
    mean = clients * share
    spread = 3 * math.sqrt(clients * share * (1 - share))
    return max(0, math.floor(mean - spread)), min(clients, math.ceil(mean + spread))


def judge(cell: Cell, budget: Budget) -> tuple[str, bool]:
    """Does the measurement agree with the budget's prediction?"""
    if cell.mode is Mode.PGBOUNCER:
        assert budget.topology.bouncer is not None
        server_ceiling = budget.server_at_peak
        per_instance = budget.topology.bouncer.servers_per_instance
        clients = parse_counts(cell.clients_by_instance)
        servers = parse_counts(cell.servers_by_instance)
        low, high = split_bounds(cell.predicted_clients, cell.pgbouncer_instances)
        problems = []
        if cell.measured_clients != cell.predicted_clients:
            problems.append(
                f"measured {cell.measured_clients} clients vs {cell.predicted_clients} predicted"
            )
        if cell.pgbouncer_servers > server_ceiling:
            problems.append(f"{cell.pgbouncer_servers} server connections > {server_ceiling}")
        if cell.pgbouncer_instances > 1:
            if not all(low <= n <= high for n in clients.values()):
                problems.append(f"clients split {cell.clients_by_instance}, outside {low}..{high}")
            if any(n > per_instance for n in servers.values()):
                problems.append(f"servers {cell.servers_by_instance} > {per_instance} each")
        if problems:
            return "; ".join(problems), False
        split = ""
        if cell.pgbouncer_instances > 1:
            split = (
                f" (split {cell.clients_by_instance}, each within {low}..{high};"
                f" servers {cell.servers_by_instance}, <= {per_instance} each)"
            )
        return (
            f"clients {cell.measured_clients} = R x W x P{split}; PgBouncer held"
            f" {cell.pgbouncer_servers} <= {server_ceiling} server connections"
        ), True
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
