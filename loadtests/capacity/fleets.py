"""Fleets no machine here can hold: 10, 100 and 1,000 replicas, planned and naive.

Each fleet carries PER_REPLICA_RPS per replica (a fleet spread for availability and
zones, not only for CPU) at WRITE_RATIO writes, on one PostgreSQL of POSTGRES_CORES
cores. Planned: the planner's shape for that target with the replica count fixed
(`python -m service.budget plan --replicas R`): pools, PgBouncers, server pools and
max_connections as it says, coalescing on. Naive, the seed pattern: every worker a
pool of NAIVE_POOL straight to the same PostgreSQL, no coalescing. Both get a core per
worker, per PgBouncer, and PostgreSQL's own, and a network round trip per hop.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtests.capacity.model import Mix, Outcome, Setup, simulate
from service.calibration import Calibration
from service.planner import Plan, Target, plan

FLEETS = (10, 100, 1000)
PER_REPLICA_RPS = 100.0
WRITE_RATIO = 0.1
POSTGRES_CORES = 32
NAIVE_POOL = 10
RTT_MS = 0.5
POOL_TIMEOUT_MS = 2000.0
REQUESTS = 20_000  # simulated per fleet, after the warm-up
OVERLOAD = 2.0  # the planned shape also runs at this multiple of its target


@dataclass(frozen=True)
class Fleet:
    """One fleet: its sizing, the plan behind it, the model's setup and outcome."""

    replicas: int
    sizing: str  # "planned" or "naive"
    target_rps: float
    plan: Plan
    setup: Setup
    outcome: Outcome


def _duration(rps: float, warmup_ms: float, timeouts: bool = False) -> float:
    """Long enough for REQUESTS (and, with `timeouts`, for a request stuck without a
    connection to time out)."""
    run = 1000 * REQUESTS / rps
    return warmup_ms + (max(run, POOL_TIMEOUT_MS + 200) if timeouts else run)


def fleet_plan(replicas: int, calibration: Calibration) -> Plan:
    """The planner's shape for `replicas` x PER_REPLICA_RPS."""
    target = Target(
        rps=replicas * PER_REPLICA_RPS,
        write_ratio=WRITE_RATIO,
        postgres_cores=POSTGRES_CORES,
        rtt_ms=RTT_MS,
        replicas=replicas,
    )
    return plan(target, calibration)


def planned_setup(p: Plan, load: float = 1.0, seed: int = 1) -> Setup:
    """The plan's shape, offered `load` x its target."""
    s = p.shape
    warmup = 200.0
    return Setup(
        replicas=s.replicas,
        workers=s.workers,
        pool_min=s.pool_min,
        pool_max=s.pool_max,
        mix=Mix(read=1 - WRITE_RATIO, write=WRITE_RATIO),
        rps=p.target.rps * load,
        coalesce_max=64,
        pool_timeout_ms=POOL_TIMEOUT_MS,
        via_pgbouncer=True,
        instances=s.instances,
        default_pool_size=s.default_pool_size,
        query_wait_timeout_ms=1000 * s.query_wait_timeout,
        postgres_cores=p.target.postgres_cores,
        max_connections=s.max_connections,
        other_backends=3,
        rtt_ms=RTT_MS,
        duration_ms=_duration(p.target.rps * load, warmup),
        warmup_ms=warmup,
        seed=seed,
    )


def naive_setup(p: Plan, seed: int = 1) -> Setup:
    """The same fleet and PostgreSQL, every worker a pool of NAIVE_POOL, direct."""
    s = p.shape
    warmup = 200.0
    return Setup(
        replicas=s.replicas,
        workers=s.workers,
        pool_min=NAIVE_POOL,
        pool_max=NAIVE_POOL,
        mix=Mix(read=1 - WRITE_RATIO, write=WRITE_RATIO),
        rps=p.target.rps,
        coalesce_max=1,
        pool_timeout_ms=POOL_TIMEOUT_MS,
        via_pgbouncer=False,
        postgres_cores=p.target.postgres_cores,
        max_connections=s.max_connections,
        other_backends=3,
        rtt_ms=RTT_MS,
        reconnect_ms=POOL_TIMEOUT_MS,
        duration_ms=_duration(p.target.rps, warmup, timeouts=True),
        warmup_ms=warmup,
        seed=seed,
    )


def run_fleets(calibration: Calibration, fleets: tuple[int, ...] = FLEETS) -> list[Fleet]:
    """Every fleet: planned, planned at OVERLOAD x the target, naive."""
    found = []
    for replicas in fleets:
        p = fleet_plan(replicas, calibration)
        runs = (
            ("planned", planned_setup(p)),
            (f"planned x{OVERLOAD:g}", planned_setup(p, OVERLOAD)),
            ("naive", naive_setup(p)),
        )
        for sizing, setup in runs:
            found.append(
                Fleet(replicas, sizing, p.target.rps, p, setup, simulate(setup, calibration))
            )
    return found
