"""What the benchmark runs: the configurations, the endpoints, each run's key, the rounds.

Results are keyed by RunKey (a configuration, an endpoint, and the wrk connections
when not the default), never by the labels the report prints: LABELS is the one
place those are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

SEED_ITEMS = 1000
APP = "app"
WORKERS = 2
POOL = 4


class Endpoint(Enum):
    """What a run asks for; the value is what the report calls it."""

    GET_ITEM = "GET /items/{id}"
    LIST_ITEMS = "GET /items?limit=20"
    POST_VISIT = "POST /visits"
    HEALTHZ = "GET /healthz"
    PGBENCH_SELECT = "pgbench SELECT by id"
    PGBENCH_VISIT = "pgbench visit write"
    PSYCOPG_SELECT = "psycopg SELECT by id"


class Config(Enum):
    """What a run measures: a replica configuration, or one of the ceilings beside them."""

    POOLED = "pooled"
    PLAIN = "plain"  # pooled, TLS off on both hops (its own PgBouncer)
    NOMETRICS = "nometrics"
    NOTIMING = "notiming"
    SINGLE = "single"
    TWO_BOUNCERS = "two-bouncers"  # coalescing off, through two PgBouncer instances
    NAIVE = "naive"
    DIRECT = "direct"
    FRAMEWORK = "framework"  # GET /healthz on the pooled replica: no database
    DATABASE = "database"  # pgbench through the same PgBouncer
    DATABASE_TWO = "database-two"  # pgbench through two PgBouncers, half the clients each
    DRIVER = "driver"  # psycopg alone (loadtests/driver_ceiling.py)

    @property
    def label(self) -> str:
        """What the report calls it."""
        return LABELS[self]

    @property
    def replica(self) -> Config:
        """The configuration whose replica serves this one's wrk runs."""
        return Config.POOLED if self is Config.FRAMEWORK else self


LABELS = {
    Config.POOLED: "pooled (as deployed)",
    Config.PLAIN: "pooled, TLS off",
    Config.NOMETRICS: "pooled, metrics off",
    Config.NOTIMING: "pooled, Server-Timing off",
    Config.SINGLE: "pooled, coalescing off",
    Config.TWO_BOUNCERS: "coalescing off, 2 PgBouncers",
    Config.NAIVE: "per-request connection",
    Config.DIRECT: "direct to PostgreSQL",
    Config.FRAMEWORK: "framework ceiling",
    Config.DATABASE: "database ceiling",
    Config.DATABASE_TWO: "database ceiling, 2 PgBouncers",
    Config.DRIVER: "driver ceiling",
}

# The replica configurations, one replica each: settings on top of the common ones.
REPLICA_SETTINGS: dict[Config, dict[str, str]] = {
    Config.POOLED: {},
    Config.PLAIN: {},  # the rig points it at the PgBouncer without TLS
    Config.NOMETRICS: {"METRICS_ENABLED": "false"},
    Config.NOTIMING: {"SERVER_TIMING": "false"},
    Config.SINGLE: {"COALESCE_MAX": "1"},
    # Its DATABASE_URL names both PgBouncers (rig.py): each connection picks one.
    Config.TWO_BOUNCERS: {"COALESCE_MAX": "1", "PGBOUNCER_INSTANCES": "2"},
    Config.NAIVE: {"CONNECTION_STRATEGY": "per-request"},
    Config.DIRECT: {"VIA_PGBOUNCER": "false"},
}


@dataclass(frozen=True)
class RunKey:
    """Which run a result belongs to: configuration, endpoint, and the wrk connections
    when not --connections (GET /items/{id} as deployed at --also-connections)."""

    config: Config
    endpoint: Endpoint
    connections: int | None = None

    @property
    def label(self) -> str:
        """The report's configuration column."""
        if self.connections is None:
            return self.config.label
        return f"{self.config.label}, {self.connections} connections"


# Each round runs these in this order: the pairs a target compares are back to back.
PLAN = [
    RunKey(Config.PLAIN, Endpoint.GET_ITEM),
    RunKey(Config.POOLED, Endpoint.GET_ITEM),
    RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ),
    RunKey(Config.NOMETRICS, Endpoint.GET_ITEM),
    RunKey(Config.NOTIMING, Endpoint.GET_ITEM),
    RunKey(Config.SINGLE, Endpoint.GET_ITEM),
    RunKey(Config.TWO_BOUNCERS, Endpoint.GET_ITEM),
    RunKey(Config.PLAIN, Endpoint.POST_VISIT),
    RunKey(Config.POOLED, Endpoint.POST_VISIT),
    RunKey(Config.SINGLE, Endpoint.POST_VISIT),
    RunKey(Config.NAIVE, Endpoint.GET_ITEM),
    RunKey(Config.DIRECT, Endpoint.GET_ITEM),
    RunKey(Config.POOLED, Endpoint.LIST_ITEMS),
    RunKey(Config.NOMETRICS, Endpoint.LIST_ITEMS),
    RunKey(Config.NAIVE, Endpoint.LIST_ITEMS),
    RunKey(Config.DIRECT, Endpoint.LIST_ITEMS),
    RunKey(Config.NOMETRICS, Endpoint.POST_VISIT),
    RunKey(Config.NAIVE, Endpoint.POST_VISIT),
    RunKey(Config.DIRECT, Endpoint.POST_VISIT),
]


# What each round runs after the wrk runs (rounds.database_clients), in that order.
DATABASE_RUNS = [
    RunKey(Config.DATABASE, Endpoint.PGBENCH_SELECT),
    RunKey(Config.DATABASE, Endpoint.PGBENCH_VISIT),
    RunKey(Config.DATABASE_TWO, Endpoint.PGBENCH_SELECT),
    RunKey(Config.DRIVER, Endpoint.PSYCOPG_SELECT),
]


CEILING_OF = {
    Endpoint.GET_ITEM: Endpoint.PGBENCH_SELECT,
    Endpoint.LIST_ITEMS: Endpoint.PGBENCH_SELECT,
    Endpoint.POST_VISIT: Endpoint.PGBENCH_VISIT,
}


# The coalesced statement (service/coalesce.py) behind each endpoint, by metrics label.
STATEMENT_OF = {Endpoint.GET_ITEM: "items by id", Endpoint.POST_VISIT: "visits"}


class Pair(Enum):
    """A ratio a target compares; the value is its name in the report."""

    ITEM_VS_FRAMEWORK = "GET /items/{id} vs framework ceiling"
    VISIT_VS_ITEM = "POST /visits vs GET /items/{id}"
    ITEM_METRICS = "GET /items/{id} metrics on vs off"
    ITEM_TIMING = "GET /items/{id} Server-Timing on vs off"
    ITEM_COALESCING = "GET /items/{id} coalescing on vs off"
    VISIT_COALESCING = "POST /visits coalescing on vs off"
    ITEM_TLS = "GET /items/{id} TLS on vs off"
    VISIT_TLS = "POST /visits TLS on vs off"
    ITEM_TWO_BOUNCERS = "GET /items/{id} coalescing off, 2 PgBouncers vs 1"
    PGBENCH_TWO_BOUNCERS = "pgbench SELECT, 2 PgBouncers vs 1"


# Ratios a target compares, each taken between two runs of the same round.
PAIRS = {
    Pair.ITEM_VS_FRAMEWORK: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ),
    ),
    Pair.VISIT_VS_ITEM: (
        RunKey(Config.POOLED, Endpoint.POST_VISIT),
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
    ),
    Pair.ITEM_METRICS: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.NOMETRICS, Endpoint.GET_ITEM),
    ),
    Pair.ITEM_TIMING: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.NOTIMING, Endpoint.GET_ITEM),
    ),
    Pair.ITEM_COALESCING: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.SINGLE, Endpoint.GET_ITEM),
    ),
    Pair.VISIT_COALESCING: (
        RunKey(Config.POOLED, Endpoint.POST_VISIT),
        RunKey(Config.SINGLE, Endpoint.POST_VISIT),
    ),
    Pair.ITEM_TLS: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.PLAIN, Endpoint.GET_ITEM),
    ),
    Pair.VISIT_TLS: (
        RunKey(Config.POOLED, Endpoint.POST_VISIT),
        RunKey(Config.PLAIN, Endpoint.POST_VISIT),
    ),
    Pair.ITEM_TWO_BOUNCERS: (
        RunKey(Config.TWO_BOUNCERS, Endpoint.GET_ITEM),
        RunKey(Config.SINGLE, Endpoint.GET_ITEM),
    ),
    Pair.PGBENCH_TWO_BOUNCERS: (
        RunKey(Config.DATABASE_TWO, Endpoint.PGBENCH_SELECT),
        RunKey(Config.DATABASE, Endpoint.PGBENCH_SELECT),
    ),
}


@dataclass(frozen=True)
class Options:
    """The command line: rounds, seconds per run, wrk connections, the lower
    concurrencies GET /items/{id} also runs at, and whether to profile."""

    rounds: int
    duration: int
    connections: int
    also_connections: tuple[int, ...]
    profile: bool

    def http_runs(self, round_: int = 1) -> list[tuple[RunKey, int]]:
        """One round's wrk runs, in order, each with its connections: the PLAN at
        --connections, then GET /items/{id} as deployed at each --also-connections (the
        same rate with less queueing shows how much of the latency is waiting, not work).

        Even rounds run the PLAN backwards: the pairs a target compares stay back to
        back, but which of the two goes first alternates. In a fixed order the first of
        a pair ran measurably slower than the second (8% for Server-Timing on vs off,
        2% once alternated), which a per-round ratio takes for the feature's cost.
        """
        extra = [
            (RunKey(Config.POOLED, Endpoint.GET_ITEM, c if c != self.connections else None), c)
            for c in self.also_connections
        ]
        plan = PLAN if round_ % 2 else list(reversed(PLAN))
        return [(key, self.connections) for key in plan] + extra
