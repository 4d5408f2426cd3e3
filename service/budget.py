"""The connection budget: whether R replicas x W workers x P pooled connections fit.

Two sides (README.md, "The connection budget"). App pools -> PgBouncer:
`R * W * POOL_MAX` client connections at peak (`R * W * POOL_MIN` at rest) against
`instances * max_client_conn`, less the other clients of each PgBouncer and an allowance
for uneven balancing.
PgBouncer -> PostgreSQL: `instances * pools * (default_pool_size + reserve_pool_size)`
server connections (capped per instance by `max_db_connections`) against
`max_connections - superuser_reserved_connections - other direct clients`. In direct
mode (no PgBouncer) the app's connections land on `max_connections` themselves.

Everything else (the replica's start-up guard, `make up`, the sweep) imports this
module instead of re-deriving the arithmetic. The core is pure: frozen dataclasses in,
a frozen `Budget` out. `python -m service.budget [--json] [--direct] [--replicas N ...]`
prints it; exit code 0 when it fits, 1 when it does not, 2 on bad input.
`python -m service.budget plan --target-rps N` sizes a shape for a target instead
(service/planner.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.settings import DeploymentSettings, Settings

logger = logging.getLogger("service.budget")

# Clients that are not app pools. Each PgBouncer also serves the Prometheus exporter,
# an operator's admin console and the load tests' connection sampler; PostgreSQL also
# serves its own exporter, an operator's psql and the sampler's pg_stat_activity query.
DEFAULT_BOUNCER_EXTRA_CLIENTS = 3
DEFAULT_POSTGRES_OTHER_CLIENTS = 3
# A load balancer (a k8s Service, haproxy) never spreads connections perfectly across
# PgBouncer instances: the busiest one is assumed to get up to 10% over its even share.
DEFAULT_SKEW = 0.10

Mode = Literal["pgbouncer", "direct"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class AppShape:
    """The service: `replicas` gunicorns of `workers` processes, each a pool_min..pool_max pool."""

    replicas: int
    workers: int
    pool_min: int
    pool_max: int

    def __post_init__(self) -> None:
        _require(self.replicas >= 0, f"replicas must be 0 or more (got {self.replicas})")
        _require(self.workers >= 1, f"workers must be 1 or more (got {self.workers})")
        _require(self.pool_min >= 0, f"POOL_MIN must be 0 or more (got {self.pool_min})")
        _require(self.pool_max >= 1, f"POOL_MAX must be 1 or more (got {self.pool_max})")
        _require(
            self.pool_min <= self.pool_max,
            f"POOL_MIN ({self.pool_min}) must not exceed POOL_MAX ({self.pool_max})",
        )

    @property
    def per_replica(self) -> int:
        """Client connections one replica opens at peak (W x POOL_MAX)."""
        return self.workers * self.pool_max


@dataclass(frozen=True)
class BouncerLimits:
    """PgBouncer's limits, each per instance, as pgbouncer.ini sets them."""

    max_client_conn: int
    default_pool_size: int
    reserve_pool_size: int
    max_db_connections: int = 0  # 0: no cap, PgBouncer's own meaning
    instances: int = 1
    pools: int = 1  # (database, user) pairs; assumed to share one database
    extra_clients: int = DEFAULT_BOUNCER_EXTRA_CLIENTS  # non-app clients, per instance
    skew: float = DEFAULT_SKEW  # the busiest instance gets up to (1 + skew) x its share

    def __post_init__(self) -> None:
        for name, value, least in (
            ("max_client_conn", self.max_client_conn, 1),
            ("default_pool_size", self.default_pool_size, 1),
            ("reserve_pool_size", self.reserve_pool_size, 0),
            ("max_db_connections", self.max_db_connections, 0),
            ("PgBouncer instances", self.instances, 1),
            ("pools", self.pools, 1),
            ("PgBouncer extra clients", self.extra_clients, 0),
        ):
            _require(value >= least, f"{name} must be {least} or more (got {value})")
        _require(0 <= self.skew < 1, f"skew must be at least 0 and below 1 (got {self.skew})")

    @property
    def servers_per_instance(self) -> int:
        """Server connections one instance may open: its pools at full size plus reserve."""
        wanted = self.pools * (self.default_pool_size + self.reserve_pool_size)
        return min(wanted, self.max_db_connections) if self.max_db_connections else wanted

    @property
    def app_capacity(self) -> int:
        """Client connections the app's pools may hold in all, other clients and skew aside.

        With one instance it takes everything; with n, the busiest instance gets
        (1 + skew) x C / n, which must stay within max_client_conn less the extras.
        """
        per_instance = self.max_client_conn - self.extra_clients
        if per_instance <= 0:
            return 0
        if self.instances == 1:
            return per_instance
        # Exact arithmetic: 0.1 as a float would turn 900 x 1.1 into 990.0000000000001.
        skew = Fraction(self.skew).limit_denominator(10**6)
        return math.floor(Fraction(per_instance * self.instances) / (1 + skew))

    def busiest_instance(self, clients: int) -> int:
        """Clients on the busiest instance when `clients` app connections are spread out."""
        if self.instances == 1:
            return clients + self.extra_clients
        skew = Fraction(self.skew).limit_denominator(10**6)
        return math.ceil(Fraction(clients, self.instances) * (1 + skew)) + self.extra_clients


@dataclass(frozen=True)
class PostgresLimits:
    """PostgreSQL's connection limits, and who else connects to it directly."""

    max_connections: int
    superuser_reserved: int
    other_clients: int = DEFAULT_POSTGRES_OTHER_CLIENTS  # exporters, admin, sampler

    def __post_init__(self) -> None:
        for name, value, least in (
            ("max_connections", self.max_connections, 1),
            ("superuser_reserved_connections", self.superuser_reserved, 0),
            ("PostgreSQL other clients", self.other_clients, 0),
        ):
            _require(value >= least, f"{name} must be {least} or more (got {value})")
        _require(
            self.superuser_reserved < self.max_connections,
            f"superuser_reserved_connections ({self.superuser_reserved}) must be below"
            f" max_connections ({self.max_connections})",
        )

    @property
    def available(self) -> int:
        """Connections left for PgBouncer (or, direct, the app) once the others are in."""
        return max(0, self.max_connections - self.superuser_reserved - self.other_clients)


@dataclass(frozen=True)
class Topology:
    """Everything the budget depends on. `bouncer=None` is direct mode: no PgBouncer."""

    app: AppShape
    postgres: PostgresLimits
    bouncer: BouncerLimits | None

    @property
    def mode(self) -> Mode:
        return "direct" if self.bouncer is None else "pgbouncer"

    def with_replicas(self, replicas: int) -> Topology:
        return replace(self, app=replace(self.app, replicas=replicas))

    def direct(self) -> Topology:
        """The same service and PostgreSQL without PgBouncer in between."""
        return replace(self, bouncer=None)


@dataclass(frozen=True)
class Budget:
    """The arithmetic for one topology, and what does not fit (`problems`, empty when ok).

    The client fields are None in direct mode, where there is no PgBouncer.
    """

    topology: Topology
    clients_at_rest: int  # R x W x POOL_MIN
    clients_at_peak: int  # R x W x POOL_MAX
    client_capacity: int | None  # instances x max_client_conn
    client_usable: int | None  # of which app pools may use, extras and skew aside
    busiest_instance_clients: int | None  # on the busiest PgBouncer at peak, extras in
    server_at_peak: int  # PostgreSQL connections PgBouncer (or, direct, the app) may open
    server_available: int  # max_connections - superuser_reserved - other clients
    max_safe_replicas: int  # the most replicas of this shape that fit (0: not even one)
    problems: tuple[str, ...] = field(default=())

    @property
    def mode(self) -> Mode:
        return self.topology.mode

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def client_headroom(self) -> int | None:
        if self.client_usable is None:
            return None
        return self.client_usable - self.clients_at_peak

    @property
    def server_headroom(self) -> int:
        return self.server_available - self.server_at_peak

    def as_dict(self) -> dict[str, Any]:
        """Every input and result, JSON-ready."""
        return {
            "ok": self.ok,
            "mode": self.mode,
            "topology": asdict(self.topology),
            "clients_at_rest": self.clients_at_rest,
            "clients_at_peak": self.clients_at_peak,
            "client_capacity": self.client_capacity,
            "client_usable": self.client_usable,
            "client_headroom": self.client_headroom,
            "busiest_instance_clients": self.busiest_instance_clients,
            "server_at_peak": self.server_at_peak,
            "server_available": self.server_available,
            "server_headroom": self.server_headroom,
            "max_safe_replicas": self.max_safe_replicas,
            "problems": list(self.problems),
        }


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _demand(app: AppShape) -> str:
    return (
        f"{_plural(app.replicas, 'replica')} x {_plural(app.workers, 'worker')}"
        f" x POOL_MAX {app.pool_max} = {app.replicas * app.per_replica}"
    )


def _postgres_available(pg: PostgresLimits) -> str:
    return (
        f"max_connections {pg.max_connections} - superuser_reserved_connections"
        f" {pg.superuser_reserved} - {_plural(pg.other_clients, 'other client')}"
    )


def _servers(bouncer: BouncerLimits) -> str:
    text = (
        f"{_plural(bouncer.instances, 'instance')} x {_plural(bouncer.pools, 'pool')}"
        f" x (default_pool_size {bouncer.default_pool_size}"
        f" + reserve_pool_size {bouncer.reserve_pool_size})"
    )
    if bouncer.max_db_connections:
        text += f", max_db_connections {bouncer.max_db_connections} per instance"
    return text


def _clients_usable(bouncer: BouncerLimits) -> str:
    text = (
        f"{_plural(bouncer.instances, 'instance')} x max_client_conn {bouncer.max_client_conn}"
        f" less {_plural(bouncer.extra_clients, 'other client')} each"
    )
    if bouncer.instances > 1:
        text += f" and {bouncer.skew:.0%} for uneven balancing"
    return text


def max_safe_replicas(topology: Topology) -> int:
    """The most replicas of this shape the budget holds at peak (0 when not even one fits)."""
    app, pg, bouncer = topology.app, topology.postgres, topology.bouncer
    if bouncer is None:
        return pg.available // app.per_replica
    if bouncer.instances * bouncer.servers_per_instance > pg.available:
        return 0  # PgBouncer alone can overrun PostgreSQL, whatever the replica count
    return bouncer.app_capacity // app.per_replica


def check(topology: Topology) -> Budget:
    """The budget of `topology`, with a human-readable problem for each side that overflows."""
    app, pg, bouncer = topology.app, topology.postgres, topology.bouncer
    at_rest = app.replicas * app.workers * app.pool_min
    at_peak = app.replicas * app.per_replica
    problems: list[str] = []
    if bouncer is None:
        server_at_peak = at_peak
        if at_peak > pg.available:
            problems.append(
                f"PostgreSQL (direct, no PgBouncer): {_demand(app)} connections at peak,"
                f" above the {pg.available} it has for them ({_postgres_available(pg)}):"
                " clients past that get 'sorry, too many clients already'"
            )
        return Budget(
            topology=topology,
            clients_at_rest=at_rest,
            clients_at_peak=at_peak,
            client_capacity=None,
            client_usable=None,
            busiest_instance_clients=None,
            server_at_peak=server_at_peak,
            server_available=pg.available,
            max_safe_replicas=max_safe_replicas(topology),
            problems=tuple(problems),
        )

    usable = bouncer.app_capacity
    if at_peak > usable:
        problems.append(
            f"PgBouncer clients: {_demand(app)} at peak, above the {usable} the app's pools"
            f" may hold ({_clients_usable(bouncer)}): PgBouncer refuses connections past"
            " max_client_conn"
        )
    server_at_peak = bouncer.instances * bouncer.servers_per_instance
    if server_at_peak > pg.available:
        problems.append(
            f"PostgreSQL: PgBouncer may open {server_at_peak} server connections"
            f" ({_servers(bouncer)}), above the {pg.available} PostgreSQL has for them"
            f" ({_postgres_available(pg)})"
        )
    return Budget(
        topology=topology,
        clients_at_rest=at_rest,
        clients_at_peak=at_peak,
        client_capacity=bouncer.instances * bouncer.max_client_conn,
        client_usable=usable,
        busiest_instance_clients=bouncer.busiest_instance(at_peak),
        server_at_peak=server_at_peak,
        server_available=pg.available,
        max_safe_replicas=max_safe_replicas(topology),
        problems=tuple(problems),
    )


class BudgetExceeded(RuntimeError):
    """Not even one replica of this shape fits the budget: it must not start."""


def guard(topology: Topology, log: logging.Logger = logger) -> Budget:
    """The replica's start-up check: refuse when one replica alone cannot fit, warn on more.

    Raises BudgetExceeded (its message names the numbers) when a single replica
    overflows either side; logs a warning per problem when only the declared replica
    count does, since other replicas may not be running yet (or ever).
    """
    alone = check(topology.with_replicas(1))
    if not alone.ok:
        raise BudgetExceeded(
            "this replica cannot fit the connection budget: " + "; ".join(alone.problems)
        )
    budget = check(topology)
    for problem in budget.problems:
        log.warning(
            "connection budget: %s (at most %d replicas of this shape fit)",
            problem,
            budget.max_safe_replicas,
        )
    return budget


# The limits the replicas' start-up guard checks and PgBouncer or PostgreSQL run with:
# each deployment (compose, k8s) must give every component the same values.
SHARED_LIMITS = (
    "PGBOUNCER_MAX_CLIENT_CONN",
    "PGBOUNCER_DEFAULT_POOL_SIZE",
    "PGBOUNCER_RESERVE_POOL_SIZE",
    "PGBOUNCER_MAX_DB_CONNECTIONS",
    "PGBOUNCER_QUERY_WAIT_TIMEOUT",
    "POSTGRES_MAX_CONNECTIONS",
    "POSTGRES_SUPERUSER_RESERVED",
)


def environment_topology(
    env: Mapping[str, str], *, replicas: int, instances: int = 1, direct: bool = False
) -> Topology:
    """The topology a replica with environment `env` belongs to (compose, k8s checks,
    and the settings themselves through `deployment_topology`).

    The variable names are the service's and DeploymentSettings' own: WORKERS,
    POOL_MIN, POOL_MAX, PGBOUNCER_*, POSTGRES_*. A missing one is a KeyError naming it.
    `direct`: the replicas connect straight to PostgreSQL (no PgBouncer limits apply).
    """
    return Topology(
        app=AppShape(
            replicas=replicas,
            workers=int(env["WORKERS"]),
            pool_min=int(env["POOL_MIN"]),
            pool_max=int(env["POOL_MAX"]),
        ),
        postgres=PostgresLimits(
            max_connections=int(env["POSTGRES_MAX_CONNECTIONS"]),
            superuser_reserved=int(env["POSTGRES_SUPERUSER_RESERVED"]),
        ),
        bouncer=None
        if direct
        else BouncerLimits(
            max_client_conn=int(env["PGBOUNCER_MAX_CLIENT_CONN"]),
            default_pool_size=int(env["PGBOUNCER_DEFAULT_POOL_SIZE"]),
            reserve_pool_size=int(env["PGBOUNCER_RESERVE_POOL_SIZE"]),
            max_db_connections=int(env["PGBOUNCER_MAX_DB_CONNECTIONS"]),
            instances=instances,
        ),
    )


def deployment_topology(
    service: Settings | None = None,
    stack: DeploymentSettings | None = None,
    *,
    direct: bool | None = None,
) -> Topology:
    """The deployment's topology, from its settings (by default, the environment's).

    `direct` defaults to the settings' VIA_PGBOUNCER (false means direct).
    """
    from service.settings import DeploymentSettings, Settings

    service = service or Settings()
    stack = stack or DeploymentSettings()
    if direct is None:
        direct = not stack.via_pgbouncer
    # The settings under the names of the variables that set them, as compose and k8s
    # give them to a replica: one way from numbers to a Topology.
    env = {
        name.upper(): str(value)
        for model in (stack, service)
        for name, value in model.model_dump().items()
    }
    return environment_topology(
        env, replicas=stack.replicas, instances=stack.pgbouncer_instances, direct=direct
    )


# ---- the command line -----------------------------------------------------------------


def summary(budget: Budget) -> str:
    """The budget in one line (what `make up` prints before it changes anything)."""
    verdict = "ok" if budget.ok else "DOES NOT FIT"
    if budget.mode == "direct":
        return (
            f"{budget.clients_at_peak} connections straight to PostgreSQL at peak,"
            f" {budget.server_available} available: {verdict}"
        )
    return (
        f"{budget.clients_at_peak} client connections at peak ({budget.client_usable} usable),"
        f" {budget.server_at_peak} server connections ({budget.server_available} available):"
        f" {verdict}"
    )


def render(budget: Budget) -> str:
    """The budget as a table for people."""
    t = budget.topology
    app, pg, bouncer = t.app, t.postgres, t.bouncer
    title = "through PgBouncer" if bouncer else "direct to PostgreSQL, no PgBouncer"
    shape = (
        f"{_plural(app.replicas, 'replica')} x {_plural(app.workers, 'worker')}"
        f" x pool {app.pool_min}..{app.pool_max}"
    )
    rows: list[tuple[str, str, str]] = [
        ("app connections" if bouncer is None else "app -> PgBouncer", "", ""),
        ("  at rest", str(budget.clients_at_rest), "R x W x POOL_MIN"),
        ("  at peak", str(budget.clients_at_peak), "R x W x POOL_MAX"),
    ]
    if bouncer is not None:
        rows += [
            (
                "  capacity",
                str(budget.client_capacity),
                f"{_plural(bouncer.instances, 'instance')} x max_client_conn"
                f" {bouncer.max_client_conn}",
            ),
            ("  usable by the app", str(budget.client_usable), _clients_usable(bouncer)),
            ("  headroom", str(budget.client_headroom), ""),
            (
                "  busiest instance",
                str(budget.busiest_instance_clients),
                "clients at peak, other clients included",
            ),
            ("", "", ""),
            ("PgBouncer -> PostgreSQL", "", ""),
            ("  at peak", str(budget.server_at_peak), _servers(bouncer)),
        ]
    else:
        rows += [
            ("", "", ""),
            ("PostgreSQL", "", ""),
            ("  at peak", str(budget.server_at_peak), "every pooled connection is a backend"),
        ]
    rows += [
        ("  available", str(budget.server_available), _postgres_available(pg)),
        ("  headroom", str(budget.server_headroom), ""),
        ("", "", ""),
        (
            "largest safe replicas",
            str(budget.max_safe_replicas),
            f"at {app.per_replica} connections each (W x POOL_MAX)",
        ),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [f"connection budget {title}: {shape}", ""]
    for label, value, note in rows:
        lines.append(f"  {label:<{width}}  {value:>6}  {note}".rstrip())
    lines.append("")
    if budget.ok:
        lines.append("verdict: ok")
    else:
        lines.append("verdict: FAILS")
        lines += [f"  - {problem}" for problem in budget.problems]
    return "\n".join(lines)


def _parser(defaults: Topology, direct: bool) -> argparse.ArgumentParser:
    app, pg, bouncer = defaults.app, defaults.postgres, defaults.bouncer
    assert bouncer is not None  # main asks deployment_topology for PgBouncer's limits
    parser = argparse.ArgumentParser(
        prog="python -m service.budget",
        description="Check the connection budget. The defaults are the local stack's"
        " settings, read from the environment as `make up` reads them (REPLICAS, WORKERS,"
        " POOL_MIN, POOL_MAX, PGBOUNCER_*, POSTGRES_*).",
        epilog="exit code: 0 when the budget holds, 1 when it does not, 2 on bad input",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=direct,
        help="no PgBouncer: app pools connect to PostgreSQL (default: VIA_PGBOUNCER=false)",
    )

    def flag(group: argparse._ArgumentGroup, name: str, default: float, text: str) -> None:
        group.add_argument(name, type=type(default), default=default, help=text)

    group = parser.add_argument_group("service")
    flag(group, "--replicas", app.replicas, "replicas (gunicorn masters)")
    flag(group, "--workers", app.workers, "worker processes per replica")
    flag(group, "--pool-min", app.pool_min, "connections each worker keeps open")
    flag(group, "--pool-max", app.pool_max, "most connections a worker opens")
    group = parser.add_argument_group("PgBouncer, per instance")
    flag(group, "--max-client-conn", bouncer.max_client_conn, "max_client_conn")
    flag(group, "--default-pool-size", bouncer.default_pool_size, "default_pool_size")
    flag(group, "--reserve-pool-size", bouncer.reserve_pool_size, "reserve_pool_size")
    flag(group, "--max-db-connections", bouncer.max_db_connections, "0: no cap")
    flag(group, "--pgbouncer-instances", bouncer.instances, "PgBouncer instances")
    flag(group, "--pools", bouncer.pools, "(database, user) pools")
    flag(
        group,
        "--pgbouncer-extra-clients",
        bouncer.extra_clients,
        "non-app clients of each instance (exporter, admin, sampler)",
    )
    flag(group, "--skew", bouncer.skew, "share over its even split the busiest instance gets")
    group = parser.add_argument_group("PostgreSQL")
    flag(group, "--max-connections", pg.max_connections, "max_connections")
    flag(group, "--superuser-reserved", pg.superuser_reserved, "superuser_reserved_connections")
    flag(
        group,
        "--other-clients",
        pg.other_clients,
        "direct clients besides PgBouncer (exporter, admin, sampler)",
    )
    return parser


def _topology(args: argparse.Namespace) -> Topology:
    return Topology(
        app=AppShape(args.replicas, args.workers, args.pool_min, args.pool_max),
        postgres=PostgresLimits(args.max_connections, args.superuser_reserved, args.other_clients),
        bouncer=None
        if args.direct
        else BouncerLimits(
            max_client_conn=args.max_client_conn,
            default_pool_size=args.default_pool_size,
            reserve_pool_size=args.reserve_pool_size,
            max_db_connections=args.max_db_connections,
            instances=args.pgbouncer_instances,
            pools=args.pools,
            extra_clients=args.pgbouncer_extra_clients,
            skew=args.skew,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m service.budget`: 0 when the budget holds, 1 when not, 2 on bad input.

    `python -m service.budget plan ...` is the capacity planner (service/planner.py).
    """
    from pydantic import ValidationError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from service.planner import main as plan_main

        return plan_main(argv[1:])

    from service.settings import DeploymentSettings

    try:
        direct = not DeploymentSettings().via_pgbouncer
        defaults = deployment_topology(direct=False)  # PgBouncer's limits, for the flags
    except (ValidationError, ValueError) as exc:
        print(f"error: invalid settings in the environment:\n{exc}", file=sys.stderr)
        return 2
    parser = _parser(defaults, direct)
    args = parser.parse_args(argv)  # exits 2 on unknown flags or non-numbers
    try:
        budget = check(_topology(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(budget.as_dict(), indent=2) if args.json else render(budget))
    return 0 if budget.ok else 1


if __name__ == "__main__":
    sys.exit(main())
