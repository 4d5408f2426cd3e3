"""A discrete-event model of the deployment (SimPy), driven by the calibration.

R replicas x W workers, each a single-threaded process with a pool (POOL_MIN..POOL_MAX,
grown on demand, checkout queue bounded by POOL_TIMEOUT and POOL_MAX_WAITING) and
coalescing as service/coalesce.py does it (a request that finds a batch of its kind
waiting for a connection joins it; one statement serves the batch). Behind them N
PgBouncers, each one core with a pool of default_pool_size server connections that a
statement waits for at most query_wait_timeout, or, direct, PostgreSQL's own slots
(max_connections less the reserved and the others), past which connecting is refused.
PostgreSQL runs statements on C cores, one process per backend. Every CPU burst costs
what the calibration says (service/calibration.py); no number is fitted to the results
the model is checked against (validate.py names the few that are not the bench's).

On this machine (`shared_cores`), every process also competes for the same cores, the
load generator (Locust, one process) and the load balancer included; a fleet gets a
core per worker, per PgBouncer, and PostgreSQL's own.

Time is in milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import simpy

from service.calibration import Calibration, Kind

Process = Generator[simpy.Event, Any, Any]


@dataclass(frozen=True)
class Mix:
    """Shares of the request kinds (they sum to 1)."""

    read: float = 1.0
    list: float = 0.0
    write: float = 0.0

    def draw(self, rng: random.Random) -> Kind:
        x = rng.random()
        if x < self.read:
            return "read"
        return "list" if x < self.read + self.list else "write"


@dataclass(frozen=True)
class Setup:
    """One simulated deployment and its load: `users` in a closed loop, or `rps` open."""

    replicas: int
    workers: int
    pool_min: int
    pool_max: int
    mix: Mix = Mix()
    users: int = 0  # closed loop: each keeps one request in flight, no pause
    rps: float = 0.0  # open loop: Poisson arrivals
    coalesce_max: int = 64
    pool_timeout_ms: float = 2000.0
    max_waiting: int = 128
    via_pgbouncer: bool = True
    instances: int = 1
    default_pool_size: int = 20
    query_wait_timeout_ms: float = 5000.0
    postgres_cores: int = 2
    max_connections: int = 100
    superuser_reserved: int = 3
    other_backends: int = 2  # PostgreSQL's other clients (the exporter holds two)
    shared_cores: int | None = None  # everything on these cores (this machine)
    slice_ms: float = 1.5  # the scheduler's base slice there (EEVDF: 0.75 ms x (1 + log2 2))
    load_generator_ms: float = 0.0  # per request, one single-threaded process (shared)
    balancer_ms: float = 0.0  # per request, the load balancer (shared)
    rtt_ms: float = 0.0  # network round trip per hop
    connect_ms: float = 2.0
    # Turns of a worker's event loop between a batch opening and its checkout (its
    # task is created, then runs), and between a connection given and the batch taking
    # it (the waiter wakes): requests read meanwhile join the batch.
    turns: int = 1
    # Closed loop: each user keeps one connection, served by one worker (wrk straight
    # to gunicorn). Behind the load balancer (balancer_ms), haproxy picks a replica per
    # request (leastconn) and, there, reuses the user's own keep-alive connection to
    # it, held by whichever worker accepted it. Otherwise (a Service) each request picks
    # a replica and a worker at random.
    pinned: bool = False
    # Per replica, each worker's share of the users' keep-alive connections (a sweep
    # measures it: loadtests/sweep/probes.in_flight_by_worker). The kernel hands each
    # accepted connection to one waiting worker, not in turn, so the shares are uneven
    # and differ run to run; empty: each connection goes to a worker at random.
    worker_shares: tuple[tuple[float, ...], ...] = ()
    spawn_ms: float = 0.0  # users start evenly over this (Locust's --spawn-rate)
    # Superuser clients connected before the load (the sweep's sampler): each takes a
    # free slot, leaving one fewer to the others; not counted among the backends.
    superusers: int = 0
    # psycopg_pool's first wait after a refused connection, doubled at each failure
    # (AttemptWithBackoff: INITIAL_DELAY 1 s, DELAY_JITTER 10%, DELAY_BACKOFF 2).
    reconnect_ms: float = 1000.0
    duration_ms: float = 3000.0
    warmup_ms: float = 500.0
    seed: int = 1


@dataclass
class Outcome:
    """What the sampler, Locust and the metrics would have seen."""

    requests: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_connections: int  # peak app connections (into PgBouncer, or PostgreSQL direct)
    clients_per_instance: list[int]
    pgbouncer_servers: int  # sum of each instance's peak server connections
    postgres_backends: int  # peak backends, other clients included
    refused: int  # connections PostgreSQL refused (direct)
    requests_per_statement: float  # coalesced kinds
    utilization: dict[str, float]  # busiest worker / PgBouncer, PostgreSQL, the machine
    # Reads' Server-Timing parts as the service would report them (queue, db, app) and
    # their whole latency as the load generator saw it ("locust"): (p50, p99) ms.
    read_parts: dict[str, tuple[float, float]]

    @property
    def saturated(self) -> str:
        """The tier closest to 100% busy."""
        tiers = {k: v for k, v in self.utilization.items() if k != "machine"}
        return max(tiers, key=lambda k: tiers[k])

    @property
    def error_ratio(self) -> float:
        failed = sum(self.errors.values())
        return failed / max(1, failed + self.requests)


class _Cpu:
    """A single-threaded process (or a pool of cores), with the busy time it spent.

    On a shared machine a process holds a core for consecutive bursts while it has work
    queued, up to the scheduler's slice, then goes to the back of the run queue: how
    Linux (EEVDF) shares 2 cores among a dozen busy processes, and where most of the
    latency spread on this machine comes from.
    """

    def __init__(
        self, env: simpy.Environment, capacity: int, machine: _Cpu | None, slice_ms: float = 0
    ) -> None:
        self.env = env
        self.threads = simpy.Resource(env, capacity)
        self.machine = machine
        self.slice_ms = slice_ms if capacity == 1 else 0.0
        self.core_request: Any = None
        self.held_since = 0.0
        self.busy = 0.0
        self.since = 0.0

    def run(self, ms: float) -> Process:
        """Run `ms` of CPU; 0 is a turn of the event loop (behind what is queued)."""
        with self.threads.request() as thread:
            yield thread
            machine = self.machine
            if ms <= 0:
                pass
            elif machine is None:
                yield self.env.timeout(ms)
            elif not self.slice_ms:
                with machine.threads.request() as core:
                    yield core
                    yield self.env.timeout(ms)
            else:
                if self.core_request is None:
                    self.core_request = machine.threads.request()
                    yield self.core_request
                    self.held_since = self.env.now
                yield self.env.timeout(ms)
            if self.core_request is not None and machine is not None:
                more = len(self.threads.queue) > 0
                if not more or self.env.now - self.held_since >= self.slice_ms:
                    machine.threads.release(self.core_request)
                    self.core_request = None
            if machine is not None and ms > 0:
                machine.count(ms)
            if ms > 0:
                self.count(ms)

    def count(self, ms: float) -> None:
        if self.env.now >= self.since:
            self.busy += ms


@dataclass
class _Batch:
    kind: Kind
    done: simpy.Event
    size: int = 1
    ok: bool = True
    reason: str = ""


@dataclass
class _Conn:
    instance: int  # which PgBouncer (-1: direct)
    backend: _Cpu | None  # direct: its own PostgreSQL backend


class _Sim:
    def __init__(self, setup: Setup, calibration: Calibration) -> None:
        s = self.s = setup
        self.cal = calibration
        self.env = env = simpy.Environment()
        self.rng = random.Random(setup.seed)
        self.machine = _Cpu(env, s.shared_cores, None) if s.shared_cores else None
        if self.machine:
            self.machine.since = s.warmup_ms
        # What PostgreSQL's backends run on: the machine's cores, or its own.
        self.postgres = self.machine or _Cpu(env, s.postgres_cores, None)
        self.postgres.since = s.warmup_ms
        n = s.replicas * s.workers
        self.workers = [_Worker(self, i) for i in range(n)]
        self.bouncers = [_Bouncer(self) for _ in range(s.instances if s.via_pgbouncer else 0)]
        self.generator = _Cpu(env, 1, self.machine, s.slice_ms) if s.load_generator_ms else None
        self.balancer = _Cpu(env, 1_000_000, self.machine) if s.balancer_ms else None
        self.in_flight = [0] * s.replicas  # requests haproxy has sent each replica
        self.accepted: dict[int, list[int]] = {}  # replica -> connections each worker took
        self.latencies: list[float] = []
        self.read_parts: dict[str, list[float]] = {"queue": [], "db": [], "app": [], "locust": []}
        self.errors: dict[str, int] = {}
        self.open = 0
        self.peak_open = 0
        # Slots for the app: PostgreSQL refuses all but superusers once only
        # superuser_reserved_connections are free.
        self.slots = s.max_connections - s.superuser_reserved - s.other_backends - s.superusers
        self.backends = 0
        self.peak_backends = 0
        self.refused = 0
        self.statements = 0
        self.coalesced_requests = 0
        self.postgres_busy = 0.0

    # -- what every tier does ---------------------------------------------------------

    def backend(self) -> _Cpu:
        """A PostgreSQL backend: a process of its own, on PostgreSQL's cores."""
        cpu = _Cpu(self.env, 1, self.postgres, self.s.slice_ms)
        cpu.since = self.s.warmup_ms
        return cpu

    def connect(self, worker: _Worker) -> Process:
        yield self.env.timeout(self.s.connect_ms)
        if self.s.via_pgbouncer:
            instance = self.rng.randrange(len(self.bouncers))
            self.bouncers[instance].clients += 1
            conn = _Conn(instance, None)
        else:
            if self.backends >= self.slots:
                self.refused += 1
                return None
            self.backends += 1
            self.peak_backends = max(self.peak_backends, self.backends)
            conn = _Conn(-1, self.backend())
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        return conn

    def statement(self, conn: _Conn, kind: Kind, k: int) -> Process:
        """One statement serving k requests, from the worker's send to its reply."""
        s, cal = self.s, self.cal
        pg_ms = cal.cost("postgres", kind).statement(k)
        if self.env.now >= s.warmup_ms:
            self.postgres_busy += pg_ms
        if conn.backend is not None:
            yield self.env.timeout(s.rtt_ms)
            yield from conn.backend.run(pg_ms)
            return True
        bouncer = self.bouncers[conn.instance]
        hop = s.rtt_ms / 2
        bouncer_ms = cal.cost("pgbouncer", kind).statement(k) / 2
        yield self.env.timeout(hop)
        server = yield from bouncer.server()
        if server is None:
            return False
        held = self.env.now
        yield from bouncer.cpu.run(bouncer_ms)
        yield self.env.timeout(hop)
        yield from server.run(pg_ms)
        yield self.env.timeout(hop)
        yield from bouncer.cpu.run(bouncer_ms)
        if held >= s.warmup_ms:
            bouncer.server_busy += self.env.now - held
        yield bouncer.idle.put(server)
        yield self.env.timeout(hop)
        return True

    def fail(self, reason: str, count: int = 1) -> None:
        if self.env.now >= self.s.warmup_ms:
            self.errors[reason] = self.errors.get(reason, 0) + count

    # -- the load ---------------------------------------------------------------------

    def any_worker(self, replica: int) -> _Worker:
        return self.workers[replica * self.s.workers + self.rng.randrange(self.s.workers)]

    def accepting_worker(self, replica: int) -> _Worker:
        """The worker that accepts a new keep-alive connection to `replica`: in the
        measured shares when there are some (the one furthest below its share), else
        any."""
        shares = self.s.worker_shares[replica] if replica < len(self.s.worker_shares) else ()
        if len(shares) != self.s.workers or sum(shares) <= 0:
            return self.any_worker(replica)
        accepted = self.accepted.setdefault(replica, [0] * self.s.workers)
        chosen = min(
            (w for w in range(self.s.workers) if shares[w] > 0),
            key=lambda w: (accepted[w] + 1) / shares[w],
        )
        accepted[chosen] += 1
        return self.workers[replica * self.s.workers + chosen]

    def request(self, kind: Kind, user: _User | None = None) -> Process:
        """One request from the load balancer to its answer: whether it succeeded."""
        s = self.s
        if user is not None and user.pinned is not None:
            ok = yield from user.pinned.handle(kind)
            return ok
        if not self.balancer:  # a Service: a random replica, any worker
            ok = yield from self.any_worker(self.rng.randrange(s.replicas)).handle(kind)
            return ok
        yield from self.balancer.run(s.balancer_ms)
        # haproxy's leastconn: the replica with the fewest requests in flight.
        fewest = min(self.in_flight)
        replica = self.rng.choice([r for r, n in enumerate(self.in_flight) if n == fewest])
        worker = user.worker(replica) if user is not None else self.any_worker(replica)
        self.in_flight[replica] += 1
        ok = yield from worker.handle(kind)
        self.in_flight[replica] -= 1
        return ok

    def user(self, delay: float = 0.0) -> Process:
        s = self.s
        if delay:
            yield self.env.timeout(delay)
        user = _User(self)
        if s.pinned:  # a keep-alive connection stays with the worker that accepted it
            user.pinned = self.accepting_worker(self.rng.randrange(s.replicas))
        while True:
            kind = self.s.mix.draw(self.rng)
            start = self.env.now  # Locust's clock runs from before it sends to after it reads
            if self.generator:
                yield from self.generator.run(self.s.load_generator_ms / 2)
            ok = yield from self.request(kind, user)
            if self.generator:
                yield from self.generator.run(self.s.load_generator_ms / 2)
            if ok and start >= self.s.warmup_ms:
                self.latencies.append(self.env.now - start)
                if kind == "read":
                    self.read_parts["locust"].append(self.env.now - start)
            if not ok:
                yield self.env.timeout(1.0)  # Locust moves on; keep a failing loop from spinning

    def arrivals(self) -> Process:
        while True:
            yield self.env.timeout(self.rng.expovariate(self.s.rps / 1000))
            self.env.process(self.one(self.s.mix.draw(self.rng)))

    def one(self, kind: Kind) -> Process:
        start = self.env.now
        ok = yield from self.request(kind)
        if ok and start >= self.s.warmup_ms:
            self.latencies.append(self.env.now - start)

    def run(self) -> Outcome:
        s = self.s
        for worker in self.workers:
            worker.start()
        if s.users:
            for i in range(s.users):
                self.env.process(self.user(i * s.spawn_ms / s.users))
        else:
            self.env.process(self.arrivals())
        self.env.run(until=s.duration_ms)
        window = s.duration_ms - s.warmup_ms
        lat = sorted(self.latencies)

        def pct(q: float, values: list[float] = lat) -> float:
            return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

        parts = {name: sorted(v) for name, v in self.read_parts.items() if v}

        utilization = {
            "workers": max(w.cpu.busy for w in self.workers) / window,
            "PostgreSQL": self.postgres_busy / (window * (s.shared_cores or s.postgres_cores)),
        }
        # Pools: the busiest worker's connections, all of PgBouncer's server connections.
        utilization["pools"] = max(w.conn_busy for w in self.workers) / (window * s.pool_max)
        if self.bouncers:
            utilization["PgBouncer"] = max(b.cpu.busy for b in self.bouncers) / window
            utilization["server pools"] = sum(b.server_busy for b in self.bouncers) / (
                window * s.default_pool_size * len(self.bouncers)
            )
        if self.machine:
            utilization["machine"] = self.machine.busy / (window * (s.shared_cores or 1))
        servers = sum(b.peak for b in self.bouncers)
        backends = servers if s.via_pgbouncer else self.peak_backends
        return Outcome(
            requests=len(lat),
            errors=dict(self.errors),
            rps=len(lat) / window * 1000,
            p50_ms=pct(0.50),
            p95_ms=pct(0.95),
            p99_ms=pct(0.99),
            client_connections=self.peak_open,
            clients_per_instance=[b.clients for b in self.bouncers],
            pgbouncer_servers=servers,
            postgres_backends=backends + s.other_backends,
            refused=self.refused,
            requests_per_statement=(
                self.coalesced_requests / self.statements if self.statements else 1.0
            ),
            utilization=utilization,
            read_parts={name: (pct(0.5, v), pct(0.99, v)) for name, v in parts.items()},
        )


class _Bouncer:
    """One PgBouncer: a core, its clients, and server connections opened as needed."""

    def __init__(self, sim: _Sim) -> None:
        self.sim = sim
        self.cpu = _Cpu(sim.env, 1, sim.machine, sim.s.slice_ms)
        self.cpu.since = sim.s.warmup_ms
        self.idle: simpy.Store = simpy.Store(sim.env)
        self.peak = 0  # servers opened (kept: server_idle_timeout is far longer than a run)
        self.clients = 0
        self.server_busy = 0.0  # ms of server connections held

    def server(self) -> Process:
        """An idle server, a new one while below default_pool_size, or a wait for one
        within query_wait_timeout (None past it)."""
        env, s = self.sim.env, self.sim.s
        if not self.idle.items and self.peak < s.default_pool_size:
            self.peak += 1
            yield env.timeout(s.connect_ms)
            return self.sim.backend()
        get = self.idle.get()
        got = yield get | env.timeout(s.query_wait_timeout_ms)
        if get in got:
            return got[get]
        get.cancel()
        return None


class _User:
    """A load-test user: the keep-alive connection haproxy holds for it to each replica,
    held by the worker that accepted it (http-reuse safe: a client's requests go back
    on its own idle connection)."""

    def __init__(self, sim: _Sim) -> None:
        self.sim = sim
        self.workers: dict[int, _Worker] = {}
        self.pinned: _Worker | None = None

    def worker(self, replica: int) -> _Worker:
        if replica not in self.workers:
            self.workers[replica] = self.sim.accepting_worker(replica)
        return self.workers[replica]


class _Worker:
    """One worker: its CPU, pool, checkout queue and open batches."""

    def __init__(self, sim: _Sim, index: int) -> None:
        self.sim = sim
        self.env = sim.env
        self.cpu = _Cpu(sim.env, 1, sim.machine, sim.s.slice_ms)
        self.cpu.since = sim.s.warmup_ms
        self.idle: simpy.Store = simpy.Store(sim.env)
        self.size = 0  # connections open or opening
        self.growing = False  # psycopg_pool opens one connection at a time to grow
        self.waiting = 0
        self.conn_busy = 0.0  # ms of pool connections held
        self.batches: dict[Kind, _Batch] = {}

    def start(self) -> None:
        """POOL_MIN connections, opened at once (psycopg_pool's open)."""
        for _ in range(self.sim.s.pool_min):
            self.size += 1
            self.env.process(self._add())

    def grow(self) -> None:
        """A request waits: one more connection, unless one is already on its way."""
        if self.size < self.sim.s.pool_max and not self.growing:
            self.size += 1
            self.growing = True
            self.env.process(self._add(growing=True))

    def _add(self, growing: bool = False) -> Process:
        """psycopg_pool's AddConnection: a refused attempt is tried again after a
        backoff (reconnect_timeout is longer than any run here), and a growing pool
        goes on growing while requests wait, one connection at a time."""
        s, delay = self.sim.s, 0.0
        while (conn := (yield from self.sim.connect(self))) is None:
            delay = delay * 2 if delay else s.reconnect_ms * self.sim.rng.uniform(0.9, 1.1)
            yield self.env.timeout(delay)
        yield self.idle.put(conn)
        if growing:
            # Still waiting, besides the request this connection went to.
            if self.size < s.pool_max and self.waiting > (0 if self.idle.items else 1):
                self.size += 1
                self.env.process(self._add(growing=True))
            else:
                self.growing = False

    def checkout(self, riders: int = 0) -> Process:
        """A connection within POOL_TIMEOUT, or None with the reason recorded."""
        s = self.sim.s
        if self.idle.items:
            conn = yield self.idle.get()
            return conn, ""
        if s.max_waiting and self.waiting >= s.max_waiting:
            return None, "503 too many waiting"
        self.waiting += 1
        self.grow()  # psycopg_pool grows while requests wait, up to POOL_MAX
        get = self.idle.get()
        got = yield get | self.env.timeout(s.pool_timeout_ms)
        self.waiting -= 1
        if get in got:
            return got[get], ""
        get.cancel()
        return None, "503 pool timeout"

    def handle(self, kind: Kind) -> Process:
        sim, s = self.sim, self.sim.s
        cost = sim.cal.cost("worker", kind)
        yield from self.cpu.run(cost.per_request / 2)
        # The service's own clock (service/context.py) starts once the request is read.
        started = self.env.now
        coalesced = kind != "list" and s.coalesce_max > 1
        batch = self.batches.get(kind) if coalesced else None
        if batch is not None and batch.size < s.coalesce_max:
            if s.max_waiting and self.waiting >= s.max_waiting:
                sim.fail("503 too many waiting")
                return False
            batch.size += 1
            self.waiting += 1
            yield batch.done
            self.waiting -= 1
            return batch.ok
        batch = _Batch(kind, self.env.event())
        if coalesced:
            self.batches[kind] = batch
            # The batch's task reaches the checkout queue on a later turn of the event
            # loop: requests read in this turn join it first (service/coalesce.py).
            for _ in range(self.sim.s.turns):
                yield from self.cpu.run(0)
        conn, reason = yield from self.checkout()
        queued = self.env.now - started
        if coalesced and conn is not None:
            # A connection given to a waiting task wakes it on the next turn; the batch
            # takes its requests then (Batch.take), so latecomers of this turn ride too.
            for _ in range(self.sim.s.turns):
                yield from self.cpu.run(0)
        if self.batches.get(kind) is batch:
            del self.batches[kind]
        if conn is None:
            batch.ok, batch.reason = False, reason
            sim.fail(reason, batch.size)
            batch.done.succeed()
            return False
        k = batch.size
        held = self.env.now
        yield from self.cpu.run(cost.per_statement / 2)
        ok = yield from sim.statement(conn, kind, k)
        yield from self.cpu.run(cost.per_statement / 2)
        db = self.env.now - held
        if held >= s.warmup_ms:
            self.conn_busy += db
        yield self.idle.put(conn)
        if coalesced and self.env.now >= s.warmup_ms:
            sim.statements += 1
            sim.coalesced_requests += k
        yield from self.cpu.run(cost.per_request / 2 * k)
        if ok and kind == "read" and started >= s.warmup_ms:
            # The batch's first request; its riders joined it later and queued less.
            app = self.env.now - started - queued - db
            for name, value in (("queue", queued), ("db", db), ("app", app)):
                sim.read_parts[name].append(value)
        if not ok:
            batch.ok = False
            sim.fail("query_wait_timeout", k)
        batch.done.succeed()
        return ok


def simulate(setup: Setup, calibration: Calibration) -> Outcome:
    """Run the model once."""
    return _Sim(setup, calibration).run()
