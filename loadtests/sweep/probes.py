"""What a cell reads: the pools' metrics while it runs, the sampler's and Locust's CSVs after."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil

from loadtests.common.prom import Scrape
from loadtests.common.sampling import by_replica, parse_counts
from loadtests.common.server_timing import PARTS
from loadtests.sweep.plan import Mode


class Pressure(NamedTuple):
    """One reading of the replicas' metrics ports while a cell runs."""

    waiting: int  # requests waiting in the pools, all replicas
    errors: int  # pool connections refused so far, all replicas
    # Per replica (None when its port did not answer): pid -> requests in flight there.
    in_flight: tuple[dict[str, float] | None, ...]


def pool_pressure(http: httpx.Client, urls: list[str]) -> Pressure:
    """The pools' pressure and each worker's requests in flight, from the replicas'
    metrics ports that answer.

    A refused connection is PostgreSQL (or PgBouncer) turning down a new pool connection,
    "sorry, too many clients already" when the replicas go straight to PostgreSQL.
    """
    waiting = errors = 0
    in_flight: list[dict[str, float] | None] = []
    for url in urls:
        try:
            metrics = Scrape.get(url, http)
        except httpx.HTTPError:
            in_flight.append(None)
            continue
        waiting += int(metrics.total("pgscale_pool_requests_waiting"))
        errors += int(metrics.total("pgscale_pool_connection_errors", "_total"))
        in_flight.append(metrics.by_pid("pgscale_http_requests_in_flight"))
    return Pressure(waiting, errors, tuple(in_flight))


def in_flight_by_worker(readings: list[Pressure], skip: int = 2) -> str:
    """Each worker's mean requests in flight over the cell, per replica, largest first:
    `replica-1=25.1,14.9,8.0,6.0;replica-2=...` (the first `skip` readings, while users
    start, left out).

    Closed-loop users with no pause each keep one request in flight, on the keep-alive
    connection haproxy holds to one worker: how unevenly the workers accepted those
    connections (the kernel wakes one waiting worker per connection, not in turn) is
    how unevenly they queue, and the busiest worker's queue is the cell's latency tail.
    """
    seen: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for reading in readings[skip:]:
        for replica, workers in enumerate(reading.in_flight, start=1):
            for pid, value in (workers or {}).items():
                seen[replica][pid].append(value)
    parts = []
    for replica in sorted(seen):
        means = sorted((statistics.fmean(v) for v in seen[replica].values()), reverse=True)
        parts.append(f"replica-{replica}=" + ",".join(f"{m:.1f}" for m in means))
    return ";".join(parts)


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


class CpuReading(NamedTuple):
    """CPU seconds (user + system) the load generator and the load balancer had used
    by `at` (time.monotonic())."""

    at: float
    locust: float
    haproxy: float


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds used so far by a process and its children now running (haproxy -W
    serves from a worker under its master); 0 for one that is gone."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        process = psutil.Process(pid)
        for each in (process, *process.children(recursive=True)):
            times = each.cpu_times()
            total += times.user + times.system
    except psutil.Error:  # gone, or a child gone between listing and reading
        pass
    return total


def write_cpu_csv(path: Path, readings: list[CpuReading]) -> None:
    """The readings ms_per_request took its figures from, beside Locust's CSVs."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CpuReading._fields)
        writer.writerows(readings)


def ms_per_request(readings: list[CpuReading], rps: float, skip: int = 2) -> tuple[float, float]:
    """Locust's and haproxy's CPU ms per request over the cell's steady part: from the
    `skip`-th reading (one a second: Locust's imports and its users' start are in the
    first two) to the one before last (its stop), at the rate Locust measured. (0, 0)
    when too few readings."""
    steady = readings[skip:-1]
    if len(steady) < 2 or rps <= 0:
        return 0.0, 0.0
    first, last = steady[0], steady[-1]
    per_request = 1000 / ((last.at - first.at) * rps)
    return (
        round((last.locust - first.locust) * per_request, 4),
        round((last.haproxy - first.haproxy) * per_request, 4),
    )


READ = ("GET", "/items/[id]")  # saturate.py's read by id: four of its five requests


def read_server_timing(server_timing_csv: Path) -> str:
    """Where the reads' time went inside the service: `queue=3.8/23;db=3.8/15;app=4.3/16`,
    each Server-Timing part's p50/p99 in ms for GET /items/{id}, then Locust's own
    (`locust=25/62`), from the CSV the timing plugin writes (loadtests/common/timing.py);
    empty when there is none. Beside Locust's latency it shows how much of it the
    service spent queueing for a connection, holding one, or in Python, and how much
    passed outside it (Locust, haproxy, a worker's socket not yet read)."""
    if not server_timing_csv.exists():
        return ""
    with server_timing_csv.open() as f:
        for row in csv.DictReader(f):
            if (row["Type"], row["Name"]) != READ:
                continue
            found = []
            for part in (*PARTS, "Locust"):
                p50, p99 = row.get(f"{part} 50%", ""), row.get(f"{part} 99%", "")
                if p50 and p99:
                    found.append(f"{part.lower()}={float(p50):g}/{float(p99):g}")
            return ";".join(found)
    return ""


def parse_parts(value: str) -> dict[str, tuple[float, float]]:
    """`queue=3.8/23;db=...` -> {"queue": (3.8, 23.0), ...} (read_server_timing's form)."""
    parts = {}
    for item in filter(None, value.split(";")):
        name, _, spread = item.partition("=")
        p50, _, p99 = spread.partition("/")
        parts[name] = (float(p50), float(p99))
    return parts


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
