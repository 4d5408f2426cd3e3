"""The rounds: in each, every planned wrk run against its replica, then the database
ceilings (pgbench, psycopg), each measured for CPU by process group."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

from infra.localstack import procs
from loadtests.bench.plan import STATEMENT_OF, Config, Endpoint, Options, RunKey
from loadtests.bench.probes import CPUMeter, StatementCounter, worker_rss
from loadtests.bench.results import Result, per_request
from loadtests.bench.rig import Rig, say
from loadtests.bench.runners import run_driver, run_pgbench, run_wrk
from loadtests.common.poll import Poll


def run_rounds(rig: Rig, options: Options) -> dict[RunKey, list[Result]]:
    """Every run of every round, by key, in the order of the first round."""
    raw: dict[RunKey, list[Result]] = collections.defaultdict(list)
    meter = rig.meter()
    for round_ in range(1, options.rounds + 1):
        for key, connections in options.http_runs(round_):
            result = http_run(rig, meter, key, connections, options.duration)
            result.round = round_
            raw[key].append(result)
            say(
                f"round {round_}: {key.endpoint.value:<20} {key.label:<26}"
                f" {result.rps:8.0f} req/s  p50 {result.p50_ms:6.1f} ms"
                f"  p99 {result.p99_ms:6.1f} ms  non-2xx {result.non2xx}"
                f"  CPU {sum(result.cpu_ms.values()):.2f} ms/req"
            )
        for client in database_clients(rig, options.duration):
            with meter.measuring(None) as cpu:
                run = client()
            run.round = round_
            run.cpu_ms = per_request(cpu, round(run.rps * options.duration))
            raw[run.key].append(run)
            say(
                f"round {round_}: {run.key.endpoint.value:<20} {run.key.label:<26}"
                f" {run.rps:8.0f} /s"
            )
    return raw


def http_run(rig: Rig, meter: CPUMeter, key: RunKey, connections: int, duration: int) -> Result:
    """wrk against the replica serving `key`, with its CPU, peak worker RSS (kept in the
    configuration's footprint) and requests per statement (when metrics are on)."""
    served_by = key.config.replica
    replica = rig.replicas[served_by]
    footprint = rig.footprints[served_by]
    master = procs.read_pid(replica.pid_file)
    rss = Poll(functools.partial(worker_rss, replica), 0.5)
    metrics_on = served_by is not Config.NOMETRICS
    shared = StatementCounter(replica, STATEMENT_OF.get(key.endpoint) if metrics_on else None)
    with shared, meter.measuring(master) as cpu, rss:
        data = run_wrk(replica.url, rig.lua[key.endpoint], connections, duration)
    peak = max(rss.readings, key=sum, default=[])
    footprint.rss_load_mib = max(footprint.rss_load_mib, peak, key=sum)
    return Result(
        key=key,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
        cpu_ms=per_request(cpu, data["requests"]),
        requests_per_statement=shared.requests_per_statement,
    )


def database_clients(rig: Rig, duration: int) -> list[Callable[[], Result]]:
    """pgbench with each endpoint's SQL (the SELECT again through both PgBouncers), then
    psycopg alone: the database path's ceiling (plan.DATABASE_RUNS, in that order)."""
    clients: list[Callable[[], Result]] = [
        functools.partial(
            run_pgbench, [rig.bouncer], rig.password, endpoint, path, duration, rig.scratch
        )
        for endpoint, path in rig.sql.items()
    ]
    # The same SELECT through both instances: what a second PgBouncer buys the database path.
    clients.append(
        functools.partial(
            run_pgbench,
            rig.bouncers,
            rig.password,
            Endpoint.PGBENCH_SELECT,
            rig.sql[Endpoint.PGBENCH_SELECT],
            duration,
            rig.scratch,
            Config.DATABASE_TWO,
        )
    )
    clients.append(functools.partial(run_driver, rig.pooled_url, duration))
    return clients
