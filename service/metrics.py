"""Prometheus metrics of one replica: pool saturation per worker, and HTTP traffic.

Under gunicorn every worker writes its samples to PROMETHEUS_MULTIPROC_DIR and the
master serves them all on the replica's own metrics port (service/gunicorn_conf.py).
Gauges are `liveall`: each worker is a series with its `pid` label, and its series
go away when it dies (`mark_process_dead` in gunicorn's `child_exit`). Counters and
histograms are summed over the replica's workers, dead ones included, so rates never
jump backwards when a worker is replaced.

Custom collectors cannot work across processes, so each worker pushes its pool's
statistics into gauges and counters from a periodic task (the pool keeper's tick,
service/pool.py, calls `PoolRecorder.record`).
docs/metrics.md lists every metric; tests check that list against this module.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections import Counter as Counter_
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import CURRENT

if TYPE_CHECKING:
    from service.pool import PoolHealth, PoolKeeper
    from service.settings import DeploymentSettings, Settings

logger = logging.getLogger("service.metrics")


def _worker_gauge(name: str, documentation: str) -> Gauge:
    return Gauge(name, documentation, multiprocess_mode="liveall")


# ---- the pool, per worker -------------------------------------------------------------

POOL_MIN = _worker_gauge("pgscale_pool_min_connections", "Configured POOL_MIN of the worker.")
POOL_MAX = _worker_gauge("pgscale_pool_max_connections", "Configured POOL_MAX of the worker.")
POOL_SIZE = _worker_gauge(
    "pgscale_pool_connections", "Connections the pool holds now: in use, idle or opening."
)
POOL_IN_USE = _worker_gauge(
    "pgscale_pool_connections_in_use", "Connections checked out by requests now."
)
POOL_AVAILABLE = _worker_gauge(
    "pgscale_pool_connections_available", "Idle connections ready for a request now."
)
POOL_WAITING = _worker_gauge(
    "pgscale_pool_requests_waiting", "Requests queued for a connection now."
)
POOL_ACQUIRE_SECONDS = Histogram(
    "pgscale_pool_acquire_wait_seconds",
    "Time a request waited for a pool connection (successful checkouts).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
POOL_TIMEOUTS = Counter(
    "pgscale_pool_acquire_timeouts",
    "Requests that got no connection within POOL_TIMEOUT (answered 503).",
)
POOL_REJECTED = Counter(
    "pgscale_pool_rejected",
    "Requests refused at once because POOL_MAX_WAITING were already queued (503).",
)
DB_DEADLINE_EXCEEDED = Counter(
    "pgscale_db_deadline_exceeded",
    "Database calls cut off by DB_DEADLINE (503).",
)
POOL_CONNECTION_ERRORS = Counter(
    "pgscale_pool_connection_errors",
    "Failed attempts to open a connection to PgBouncer.",
)
POOL_CONNECTIONS_LOST = Counter(
    "pgscale_pool_connections_lost",
    "Connections found broken at checkout (and replaced).",
)
STATEMENT_REQUESTS = Histogram(
    "pgscale_db_requests_per_statement",
    "Requests one statement served: 1 for a request that ran alone, more for requests"
    " that queued for a connection together and shared it (service/coalesce.py).",
    ["statement"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
DB_LOGIN_REFUSALS_REPEATED = Counter(
    "pgscale_db_login_refusals_repeated",
    "Database calls PgBouncer refused unsent while its server logins failed"
    " (server_login_retry), sent again after a pause (service/db.py).",
)
POOL_UNAVAILABLE = Counter(
    "pgscale_pool_unavailable",
    "Requests refused at once while the worker's probe finds the database path down (503).",
)
# Per worker (a `pid` label, like the gauges): which worker's pool struggles matters.
POOL_RECONNECT_ATTEMPTS = Counter(
    "pgscale_pool_reconnect_attempts",
    "Connection attempts by the worker's pool (opening, growing, replacing lost ones).",
    ["pid"],
)
POOL_RECONNECT_FAILURES = Counter(
    "pgscale_pool_reconnect_failures",
    "Connection attempts by the worker's pool that failed.",
    ["pid"],
)
POOL_RECONNECTS_GIVEN_UP = Counter(
    "pgscale_pool_reconnects_given_up",
    "Connections the pool stopped retrying after POOL_RECONNECT_TIMEOUT.",
    ["pid"],
)
POOL_REPLACEMENTS = Counter(
    "pgscale_pool_replacements",
    "Pools replaced by a fresh one: the database path came back while the pool had"
    " no connection (service/pool.py).",
    ["pid"],
)
POOL_SECONDS_WITHOUT_CONNECTION = _worker_gauge(
    "pgscale_pool_seconds_without_connection",
    "Seconds since the worker's pool last held a connection, while it needs one"
    " (0 while it holds one, or needs none).",
)
POOL_DATABASE_DOWN = _worker_gauge(
    "pgscale_pool_database_down",
    "1 while the worker's probe finds the database path down (requests refused at once).",
)
DB_CALLS_ABANDONED = _worker_gauge(
    "pgscale_db_calls_abandoned",
    "Database calls past DB_DEADLINE (answered 503) still cleaning up in the background.",
)
POOL_BAD_RETURNS = Counter(
    "pgscale_pool_bad_returns",
    "Connections returned to the pool in a bad state (and discarded).",
)

# ---- HTTP -----------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "pgscale_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "pgscale_http_request_duration_seconds",
    "Time from request to the end of the response, by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Where a request's time went (service/context.py), by route template and method: the
# same labels as the duration, so queue + db against it per route leaves the app's share.
_PART_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HTTP_QUEUE = Histogram(
    "pgscale_http_request_queue_seconds",
    "Time a request waited for a pooled connection, by route template and method"
    " (0 for requests that use none).",
    ["route", "method"],
    buckets=_PART_BUCKETS,
)
HTTP_DB = Histogram(
    "pgscale_http_request_db_seconds",
    "Time a request held a pooled connection (its statements, PgBouncer's queue"
    " included), by route template and method.",
    ["route", "method"],
    buckets=_PART_BUCKETS,
)
HTTP_IN_FLIGHT = _worker_gauge(
    "pgscale_http_requests_in_flight", "Requests being handled by the worker now."
)

# ---- the replica's own settings, for the budget's rules ------------------------------
# Constants of the replica, the same in each worker: `max` over its workers is the value.


def _setting_gauge(name: str, documentation: str) -> Gauge:
    return Gauge(name, documentation, multiprocess_mode="max")


REPLICA_WORKERS = _setting_gauge("pgscale_replica_workers", "Configured WORKERS of the replica.")
REPLICA_POOL_MIN = _setting_gauge(
    "pgscale_replica_pool_min", "Configured POOL_MIN of the replica's workers."
)
REPLICA_POOL_MAX = _setting_gauge(
    "pgscale_replica_pool_max", "Configured POOL_MAX of the replica's workers."
)
REPLICA_PGBOUNCERS = _setting_gauge(
    "pgscale_replica_pgbouncer_instances",
    "PgBouncer instances the replica's connections spread over (PGBOUNCER_INSTANCES).",
)
REPLICA_INFO = Gauge(
    "pgscale_replica_info",
    "1, labelled with the replica's REPLICA_NAME and connection strategy.",
    ["replica_name", "connection_strategy"],
    multiprocess_mode="max",
)


def record_settings(settings: Settings, deployment: DeploymentSettings) -> None:
    """The replica's shape, for the rule that compares the budget with PgBouncer's count."""
    REPLICA_WORKERS.set(settings.workers)
    REPLICA_POOL_MIN.set(settings.pool_min)
    REPLICA_POOL_MAX.set(settings.pool_max)
    REPLICA_PGBOUNCERS.set(deployment.pgbouncer_instances if deployment.via_pgbouncer else 0)
    REPLICA_INFO.labels(settings.replica_name, settings.connection_strategy).set(1)


UNMATCHED_ROUTE = "<unmatched>"  # keeps scanners' random paths out of the label set


class PoolObserver(Protocol):
    """What the database layer reports about checkouts."""

    def acquired(self, seconds: float) -> None: ...
    def timed_out(self) -> None: ...
    def rejected(self) -> None: ...
    def deadline_exceeded(self) -> None: ...
    def unavailable(self) -> None: ...
    def login_refused(self) -> None: ...
    def statement_sizes(self, statement: str) -> TalliedHistogram | None: ...


class NullPoolObserver:
    """Metrics off."""

    def statement_sizes(self, statement: str) -> TalliedHistogram | None:
        return None

    def acquired(self, seconds: float) -> None:
        pass

    def timed_out(self) -> None:
        pass

    def rejected(self) -> None:
        pass

    def deadline_exceeded(self) -> None:
        pass

    def login_refused(self) -> None:
        pass

    def unavailable(self) -> None:
        pass


class PrometheusPoolObserver:
    """Checkout outcomes into the metrics above."""

    def acquired(self, seconds: float) -> None:
        TALLY.acquire_wait.observe(seconds)

    def timed_out(self) -> None:
        POOL_TIMEOUTS.inc()

    def rejected(self) -> None:
        POOL_REJECTED.inc()

    def deadline_exceeded(self) -> None:
        DB_DEADLINE_EXCEEDED.inc()

    def unavailable(self) -> None:
        POOL_UNAVAILABLE.inc()

    def login_refused(self) -> None:
        DB_LOGIN_REFUSALS_REPEATED.inc()

    def statement_sizes(self, statement: str) -> TalliedHistogram | None:
        return TALLY.statement_sizes(statement)


class PoolRecorder:
    """One worker's pool, into the metrics above, once per keeper tick.

    The keeper's tick pops the pool's statistics (`pop_stats` resets its counters, so
    each tick adds what happened since the last one; keys may be absent when zero).
    `waiting` is the worker's own exact count (service/db.py `Database.waiting`).
    Made in the worker, after the fork: the `pid` labels are the worker's.
    """

    def __init__(self) -> None:
        pid = str(os.getpid())
        self._attempts = POOL_RECONNECT_ATTEMPTS.labels(pid)
        self._failures = POOL_RECONNECT_FAILURES.labels(pid)
        self._given_up = POOL_RECONNECTS_GIVEN_UP.labels(pid)
        self._replacements = POOL_REPLACEMENTS.labels(pid)
        self._seen_given_up = 0
        self._seen_replacements = 0

    def record(self, keeper: PoolKeeper, health: PoolHealth, waiting: int, abandoned: int) -> None:
        stats = health.stats
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        POOL_MIN.set(stats.get("pool_min", keeper.pool.min_size))
        POOL_MAX.set(stats.get("pool_max", keeper.pool.max_size))
        POOL_SIZE.set(size)
        POOL_AVAILABLE.set(available)
        POOL_IN_USE.set(keeper.in_use)
        POOL_WAITING.set(waiting)
        attempts = stats.get("connections_num", 0)
        failures = stats.get("connections_errors", 0)
        POOL_CONNECTION_ERRORS.inc(failures)
        POOL_CONNECTIONS_LOST.inc(stats.get("connections_lost", 0))
        POOL_BAD_RETURNS.inc(stats.get("returns_bad", 0))
        self._attempts.inc(attempts)
        self._failures.inc(failures)
        self._given_up.inc(keeper.gave_up_connections - self._seen_given_up)
        self._seen_given_up = keeper.gave_up_connections
        self._replacements.inc(keeper.replacements - self._seen_replacements)
        self._seen_replacements = keeper.replacements
        POOL_SECONDS_WITHOUT_CONNECTION.set(health.without_connection)
        POOL_DATABASE_DOWN.set(1 if keeper.down else 0)
        DB_CALLS_ABANDONED.set(abandoned)
        TALLY.flush()


class TalliedHistogram:
    """Observations of one histogram series, counted here and written at `flush`.

    A multiprocess `observe` is two locked writes into a shared file (the sum and one
    bucket). This keeps the same per-bucket counts and sum in plain Python and adds
    them to the series in one go. prometheus_client has no public call for "add n
    observations to a bucket", so `flush` uses the series' own bucket and sum values;
    tests/unit/test_metrics_tally.py checks that the result equals per-request `observe`.
    """

    def __init__(self, series: Histogram) -> None:
        self.series = series
        self.bounds = series._upper_bounds  # ascending, +Inf last
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount, as Histogram.observe picks.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        if not any(counts):
            return
        self.series._sum.inc(total)
        for bucket, count in zip(self.series._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class WorkerTally:
    """This worker's request counts, in-flight number, latencies (HTTP and checkout
    waits) and requests per coalesced statement, kept in plain Python.

    Each multiprocess metric update is a locked write into a shared file; doing them
    per request cost about 15% of GET /items/{id}'s throughput at first; the two
    histogram observations alone cost about 8 us a request. So the middleware and the
    pool observer only bump dict entries and ints, and `flush` (run by the periodic
    task, in the same event loop) writes the totals. Counts and histograms reach
    Prometheus at most POOL_STATS_INTERVAL late.
    """

    def __init__(self) -> None:
        self.requests: Counter_[tuple[str, str, str]] = Counter_()
        self.in_flight = 0
        self._durations: dict[tuple[str, str], RouteTally] = {}
        self.acquire_wait = TalliedHistogram(POOL_ACQUIRE_SECONDS)
        self._statements: dict[tuple[str, ...], TalliedHistogram] = {}

    def duration(self, route: str, method: str) -> RouteTally:
        """The latency tallies of a route (whole, queue, db), made once."""
        tally = self._durations.get((route, method))
        if tally is None:
            tally = self._durations[(route, method)] = RouteTally(route, method)
        return tally

    def statement_sizes(self, statement: str) -> TalliedHistogram:
        """The requests-per-statement tally of a coalesced statement, made once."""
        return _tally(self._statements, STATEMENT_REQUESTS, statement)

    def flush(self) -> None:
        pending, self.requests = self.requests, Counter_()
        for (route, method, status), count in pending.items():
            HTTP_REQUESTS.labels(route, method, status).inc(count)
        HTTP_IN_FLIGHT.set(self.in_flight)
        for per_route in self._durations.values():
            per_route.flush()
        for tally in (self.acquire_wait, *self._statements.values()):
            tally.flush()


class RouteTally:
    """One route's duration, queue and db tallies: where its requests' time went."""

    def __init__(self, route: str, method: str) -> None:
        self.duration = TalliedHistogram(HTTP_DURATION.labels(route, method))
        self.queue = TalliedHistogram(HTTP_QUEUE.labels(route, method))
        self.db = TalliedHistogram(HTTP_DB.labels(route, method))

    def flush(self) -> None:
        self.duration.flush()
        self.queue.flush()
        self.db.flush()


def _tally(
    made: dict[tuple[str, ...], TalliedHistogram], histogram: Histogram, *labels: str
) -> TalliedHistogram:
    """The tally of one labelled series of `histogram`, made on first use."""
    tally = made.get(labels)
    if tally is None:
        tally = made[labels] = TalliedHistogram(histogram.labels(*labels))
    return tally


TALLY = WorkerTally()


class HTTPMetrics:
    """Pure ASGI middleware: count and time every HTTP request by its route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        TALLY.in_flight += 1
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            TALLY.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope["method"]
            TALLY.requests[(template, method, str(status))] += 1
            tally = TALLY.duration(template, method)
            tally.duration.observe(time.perf_counter() - started)
            timing = CURRENT.get()  # set by service/context.py's middleware, outside this one
            if timing is not None:
                tally.queue.observe(timing.queue)
                tally.db.observe(timing.db)
