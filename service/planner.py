"""The capacity planner: from a target request rate to a shape the budget holds.

Every number comes from the calibration (service/calibration.py: CPU per request by
process, measured by `make bench`) and a stated rule, and the plan says which rule set
it. The planner counts on no coalescing (one statement per request): requests share
statements only once they queue, so a shape sized for headroom must hold without it.
The budget itself is service/budget.py's, checked at the two extremes a rollout goes
through (infra/k8s/check.py checks the same): clients with one PgBouncer out, servers
with every PgBouncer up and one more draining.

`python -m service.budget plan --target-rps N` prints a plan; exit 1 when none fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from service.budget import (
    DEFAULT_BOUNCER_EXTRA_CLIENTS,
    DEFAULT_POSTGRES_OTHER_CLIENTS,
    DEFAULT_SKEW,
    AppShape,
    BouncerLimits,
    Budget,
    PostgresLimits,
    Topology,
    check,
)
from service.calibration import Calibration

# ln(100): an exponential response time's p99 is ln(100) ~ 4.6 times its mean.
P99_OVER_MEAN = math.log(100)
# The HPA's averageUtilization (k8s/base/api.yaml): replicas are sized to run at it.
HPA_UTILIZATION = 0.70
# PgBouncer and PostgreSQL are sized to the same headroom.
TIER_UTILIZATION = 0.70
API_SURGE = 1  # k8s/base/api.yaml: maxSurge 1, maxUnavailable 0
SUPERUSER_RESERVED = 3


class NoShape(ValueError):
    """No shape meets the target within the limits given; the message says why."""


@dataclass(frozen=True)
class Target:
    """What the operator asks for, and the limits the answer must keep."""

    rps: float
    write_ratio: float = 0.1
    p99_ms: float = 50.0
    max_connections: int | None = None  # PostgreSQL's, when it is fixed
    workers: int = 2  # per replica: one per core of the pod's CPU limit
    postgres_cores: int = 8
    spindles: int = 1  # the wiki's effective_spindle_count (0 when fully cached)
    rtt_ms: float = 0.5  # one network round trip between tiers
    replicas: int | None = None  # a fixed count (availability, zones), else the planner's

    def __post_init__(self) -> None:
        if not self.rps > 0:
            raise ValueError(f"--target-rps must be above 0 (got {self.rps})")
        if not 0 <= self.write_ratio <= 1:
            raise ValueError(f"--write-ratio must be within 0..1 (got {self.write_ratio})")
        if not self.p99_ms > 0:
            raise ValueError(f"--p99-ms must be above 0 (got {self.p99_ms})")
        for name, value in (
            ("--workers", self.workers),
            ("--postgres-cores", self.postgres_cores),
            ("--replicas", self.replicas or 1),
            ("--max-connections", self.max_connections or 1),
        ):
            if value < 1:
                raise ValueError(f"{name} must be 1 or more (got {value})")


@dataclass(frozen=True)
class Decision:
    """One number of the shape and the rule that set it."""

    name: str
    value: float
    rule: str


@dataclass(frozen=True)
class Tier:
    """A tier's capacity at 100% of its cores and its utilization at the target."""

    name: str
    capacity_rps: float
    utilization: float


@dataclass(frozen=True)
class Shape:
    """The numbers a deployment is configured with."""

    replicas: int  # the HPA's maxReplicas
    hpa_min: int
    workers: int
    pool_min: int
    pool_max: int
    instances: int  # PgBouncer
    default_pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    max_client_conn: int
    max_connections: int  # PostgreSQL
    query_wait_timeout: float

    def topology(self, replicas: int | None = None, instances: int | None = None) -> Topology:
        """The shape as the budget sees it (by default: maxReplicas, every instance up)."""
        return Topology(
            app=AppShape(
                self.replicas if replicas is None else replicas,
                self.workers,
                self.pool_min,
                self.pool_max,
            ),
            postgres=PostgresLimits(self.max_connections, SUPERUSER_RESERVED),
            bouncer=BouncerLimits(
                max_client_conn=self.max_client_conn,
                default_pool_size=self.default_pool_size,
                reserve_pool_size=self.reserve_pool_size,
                max_db_connections=self.max_db_connections,
                instances=self.instances if instances is None else instances,
            ),
        )


@dataclass(frozen=True)
class Plan:
    """The shape, why each number, the budget at both rollout extremes, the tiers."""

    target: Target
    shape: Shape
    decisions: tuple[Decision, ...]
    serving: Budget  # one PgBouncer out: every client on the rest
    rollout: Budget  # every PgBouncer up and one more draining
    tiers: tuple[Tier, ...]

    @property
    def bottleneck(self) -> Tier:
        """The tier that saturates first as the load grows past the target."""
        return min(self.tiers, key=lambda t: t.capacity_rps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": asdict(self.target),
            "shape": asdict(self.shape),
            "rules": [asdict(d) for d in self.decisions],
            "budget_one_pgbouncer_out": self.serving.as_dict(),
            "budget_rollout": self.rollout.as_dict(),
            "tiers": [
                {
                    "tier": t.name,
                    "capacity_rps": round(t.capacity_rps),
                    "utilization": round(t.utilization, 3),
                }
                for t in self.tiers
            ],
            "bottleneck": self.bottleneck.name,
        }


def plan(target: Target, calibration: Calibration) -> Plan:
    """The shape for `target` (NoShape says why there is none)."""
    t, cal = target, calibration
    decisions: list[Decision] = []

    def decide(name: str, value: float, rule: str) -> None:
        decisions.append(Decision(name, value, rule))

    # Workers: one process, one core; the p99 budget bounds how busy it may run.
    worker_ms = cal.mix("worker", t.write_ratio)
    worker_rps = 1000 / worker_ms
    pgbouncer_ms = cal.mix("pgbouncer", t.write_ratio)
    postgres_ms = cal.mix("postgres", t.write_ratio)
    hold_ms = pgbouncer_ms + postgres_ms + 2 * t.rtt_ms  # a worker's connection, per statement
    queueing_ms = t.p99_ms - hold_ms
    p99_utilization = 1 - P99_OVER_MEAN * worker_ms / queueing_ms if queueing_ms > 0 else 0
    if p99_utilization <= 0:
        raise NoShape(
            f"p99 {t.p99_ms:g} ms is below what one request costs: {worker_ms:.3f} ms of worker"
            f" CPU x ln(100) + {hold_ms:.2f} ms holding a connection"
        )
    utilization = min(HPA_UTILIZATION, p99_utilization)
    per_replica = t.workers * worker_rps * utilization
    needed = math.ceil(t.rps / per_replica)
    replicas = t.replicas or needed
    if replicas < needed:
        raise NoShape(
            f"{replicas} replicas carry {replicas * per_replica:.0f} req/s at"
            f" {utilization:.0%} CPU, below the target {t.rps:g}: at least {needed} are needed"
        )
    decide(
        "per-worker rate",
        round(worker_rps),
        f"1000 / {worker_ms:.3f} ms worker CPU per request (calibration, no coalescing)",
    )
    decide(
        "worker utilization",
        round(utilization, 3),
        f"min(HPA target {HPA_UTILIZATION:.0%}, 1 - ln(100) x {worker_ms:.3f} /"
        f" ({t.p99_ms:g} - {hold_ms:.2f} ms)): M/M/1 p99 = ln(100) x S / (1 - rho)",
    )
    decide(
        "replicas (HPA maxReplicas)",
        replicas,
        f"ceil({t.rps:g} / ({t.workers} workers x {worker_rps:.0f} x {utilization:.2f}))"
        + ("" if t.replicas is None else f", fixed at {t.replicas}"),
    )
    hpa_min = min(replicas, 2)
    decide("HPA minReplicas", hpa_min, "2: one replica lost still serves (the PDB keeps one)")
    decide("workers per replica", t.workers, "one per core of the pod's CPU limit")

    # Pools: Little's law, connections = statements/s x hold time.
    pool_max = math.ceil(worker_rps * hold_ms / 1000) + 1
    pool_min = max(1, math.ceil(worker_rps * utilization * hold_ms / 1000))
    decide(
        "POOL_MAX",
        pool_max,
        f"Little: ceil({worker_rps:.0f}/s x {hold_ms:.2f} ms) + 1, the connections a worker"
        " keeps busy at 100% CPU, plus one for a slow statement",
    )
    decide(
        "POOL_MIN",
        pool_min,
        f"Little: ceil({worker_rps * utilization:.0f}/s x {hold_ms:.2f} ms), at the planned"
        " utilization",
    )

    # PgBouncer: one core each; with one out (rollout, node drain) the rest carry it.
    statements = t.rps  # one per request: no coalescing counted on
    bouncer_rate = 1000 / pgbouncer_ms
    instances = max(2, math.ceil(statements / (bouncer_rate * TIER_UTILIZATION)) + 1)
    decide(
        "PgBouncer instances",
        instances,
        f"ceil({statements:g} statements/s / ({bouncer_rate:.0f}/s per core x"
        f" {TIER_UTILIZATION:.0%})) + 1 out for a rollout, at least 2",
    )

    # PostgreSQL: cores for the statements; active connections by the wiki's rule.
    cores_needed = statements * postgres_ms / 1000 / TIER_UTILIZATION
    if cores_needed > t.postgres_cores:
        raise NoShape(
            f"PostgreSQL needs {cores_needed:.1f} cores for {statements:g} statements/s at"
            f" {postgres_ms:.3f} ms each and {TIER_UTILIZATION:.0%} utilization, more than the"
            f" {t.postgres_cores} given (--postgres-cores): past what one PostgreSQL can do at"
            " the calibrated cost"
        )
    wiki = 2 * t.postgres_cores + t.spindles
    # A server connection is held for PgBouncer's forwarding, the statement and a round
    # trip; a pool sized at Little's mean would run at 100%, so at TIER_UTILIZATION.
    server_hold_ms = pgbouncer_ms + postgres_ms + t.rtt_ms
    little = math.ceil(statements * server_hold_ms / 1000 / TIER_UTILIZATION)
    active = max(wiki, little)
    decide(
        "active server connections",
        active,
        f"PostgreSQL wiki: ({t.postgres_cores} cores x 2) + {t.spindles} effective_spindles ="
        f" {wiki}; Little: {statements:g}/s x {server_hold_ms:.2f} ms / {TIER_UTILIZATION:.0%}"
        f" = {little}; the larger",
    )
    default_pool_size = math.ceil(active / instances)
    reserve = max(1, math.ceil(default_pool_size / 4))
    max_db = default_pool_size + reserve
    decide("default_pool_size", default_pool_size, f"ceil({active} active / {instances} instances)")
    decide(
        "reserve_pool_size",
        reserve,
        "a quarter of default_pool_size: bursts past reserve_pool_timeout",
    )
    decide(
        "max_db_connections",
        max_db,
        "default_pool_size + reserve_pool_size: one pool per instance, capped at its size",
    )

    clients = (replicas + API_SURGE) * t.workers * pool_max
    serving = instances - 1
    skew = 1 + DEFAULT_SKEW if serving > 1 else 1
    max_client_conn = math.ceil(clients * skew / serving) + DEFAULT_BOUNCER_EXTRA_CLIENTS
    decide(
        "max_client_conn",
        max_client_conn,
        f"({replicas} + {API_SURGE} surge) x {t.workers} x POOL_MAX {pool_max} = {clients}"
        f" clients on {serving} instance(s) (one out), +{DEFAULT_SKEW:.0%} skew,"
        f" +{DEFAULT_BOUNCER_EXTRA_CLIENTS} other clients",
    )
    servers = (instances + 1) * max_db
    required = servers + SUPERUSER_RESERVED + DEFAULT_POSTGRES_OTHER_CLIENTS
    if t.max_connections is not None and t.max_connections < required:
        raise NoShape(
            f"PostgreSQL max_connections {t.max_connections} is below the {required} this shape"
            f" needs: ({instances} + 1 draining) x max_db_connections {max_db}"
            f" + {SUPERUSER_RESERVED} superuser_reserved + {DEFAULT_POSTGRES_OTHER_CLIENTS}"
            " other clients"
        )
    max_connections = t.max_connections or required
    decide(
        "PostgreSQL max_connections",
        max_connections,
        f"({instances} + 1 draining) x {max_db} + {SUPERUSER_RESERVED} superuser_reserved"
        f" + {DEFAULT_POSTGRES_OTHER_CLIENTS} other clients = {required}"
        + ("" if t.max_connections is None else f"; given {t.max_connections}"),
    )
    query_wait = 5.0
    decide(
        "query_wait_timeout",
        query_wait,
        "below DB_DEADLINE (service/rules.py), as deployed",
    )

    shape = Shape(
        replicas=replicas,
        hpa_min=hpa_min,
        workers=t.workers,
        pool_min=pool_min,
        pool_max=pool_max,
        instances=instances,
        default_pool_size=default_pool_size,
        reserve_pool_size=reserve,
        max_db_connections=max_db,
        max_client_conn=max_client_conn,
        max_connections=max_connections,
        query_wait_timeout=query_wait,
    )
    low = check(shape.topology(replicas + API_SURGE, serving))
    high = check(shape.topology(replicas + API_SURGE, instances + 1))
    if not (low.ok and high.ok):  # the rules above are meant to make this impossible
        raise NoShape("the budget does not hold: " + "; ".join(low.problems + high.problems))
    fleet_rps = replicas * t.workers * worker_rps
    tiers = (
        Tier("workers", fleet_rps, t.rps / fleet_rps),
        Tier(
            f"PgBouncer ({serving} of {instances} up)",
            serving * bouncer_rate,
            statements / (serving * bouncer_rate),
        ),
        Tier(
            "PostgreSQL",
            t.postgres_cores * 1000 / postgres_ms,
            statements * postgres_ms / 1000 / t.postgres_cores,
        ),
    )
    return Plan(t, shape, tuple(decisions), low, high, tiers)


def render(p: Plan) -> str:
    """The plan for people: the shape, the rule behind each number, the budget, the tiers."""
    from service.budget import render as render_budget

    t, s = p.target, p.shape
    lines = [
        f"plan for {t.rps:g} req/s ({t.write_ratio:.0%} writes), p99 <= {t.p99_ms:g} ms,"
        f" PostgreSQL with {t.postgres_cores} cores",
        "",
        "shape:",
        f"  replicas        {s.hpa_min}..{s.replicas} (HPA minReplicas..maxReplicas)",
        f"  workers         {s.workers} per replica",
        f"  POOL_MIN/MAX    {s.pool_min}/{s.pool_max}",
        f"  PgBouncer       {s.instances} instances, default_pool_size {s.default_pool_size},"
        f" reserve_pool_size {s.reserve_pool_size}, max_db_connections {s.max_db_connections},"
        f" max_client_conn {s.max_client_conn}, query_wait_timeout {s.query_wait_timeout:g}",
        f"  PostgreSQL      max_connections {s.max_connections}",
        "",
        "rules:",
    ]
    width = max(len(d.name) for d in p.decisions)
    for d in p.decisions:
        lines.append(f"  {d.name:<{width}}  {d.value:>8g}  {d.rule}")
    lines += ["", "tiers at the target (capacity at 100% of their cores, no coalescing):"]
    for tier in p.tiers:
        lines.append(
            f"  {tier.name:<24}  {tier.capacity_rps:>9.0f} req/s  {tier.utilization:>5.0%} busy"
        )
    b = p.bottleneck
    lines += [
        f"bottleneck: {b.name} (saturates first, at {b.capacity_rps:.0f} req/s)",
        "",
        f"-- budget with one of {s.instances} PgBouncers out (maxReplicas + surge):",
        render_budget(p.serving),
        "",
        f"-- budget with {s.instances} PgBouncers up and one draining:",
        render_budget(p.rollout),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`python -m service.budget plan`: 0 with a plan, 1 when none fits, 2 on bad input."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from service.calibration import DEFAULT_CALIBRATION, load

    parser = argparse.ArgumentParser(
        prog="python -m service.budget plan",
        description="A shape (replicas, workers, pools, PgBouncers, PostgreSQL limits) for a"
        " target request rate, from a calibration measured by `make bench`.",
        epilog="exit code: 0 with a plan, 1 when no shape fits (the reason is printed),"
        " 2 on bad input",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Target(rps=1)
    parser.add_argument("--target-rps", type=float, required=True, help="requests/s at peak")
    parser.add_argument("--write-ratio", type=float, default=d.write_ratio)
    parser.add_argument("--p99-ms", type=float, default=d.p99_ms)
    parser.add_argument(
        "--max-connections", type=int, default=None, help="PostgreSQL's, when fixed"
    )
    parser.add_argument("--postgres-cores", type=int, default=d.postgres_cores)
    parser.add_argument("--workers", type=int, default=d.workers, help="per replica")
    parser.add_argument(
        "--replicas", type=int, default=None, help="a fixed replica count (default: sized)"
    )
    parser.add_argument("--rtt-ms", type=float, default=d.rtt_ms, help="round trip per hop")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        target = Target(
            rps=args.target_rps,
            write_ratio=args.write_ratio,
            p99_ms=args.p99_ms,
            max_connections=args.max_connections,
            workers=args.workers,
            postgres_cores=args.postgres_cores,
            rtt_ms=args.rtt_ms,
            replicas=args.replicas,
        )
        calibration = load(args.calibration)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = plan(target, calibration)
    except NoShape as exc:
        if args.json:
            print(json.dumps({"fits": False, "reason": str(exc)}, indent=2))
        else:
            print(f"no shape fits: {exc}")
        return 1
    if args.json:
        print(json.dumps({"fits": True, **result.as_dict()}, indent=2))
    else:
        print(render(result))
    return 0
