"""The faults, and the phase that runs one under load and turns it into a report row.

A phase: fresh items for its writes, the steady load through haproxy, a warm-up, the
fault (injected, held, cleared), then load until a streak of successes shows recovery,
then the drain of unacknowledged writes and the audit against PostgreSQL. Each fault
is a function of the phase: it marks when the fault starts and clears, sends whatever
probes it needs through the phase (so they are counted and timed like the load), and
adds the checks that are its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psycopg

from infra.localstack import procs
from infra.localstack.postgres import FAST, IMMEDIATE
from tests.faults.burst import connections_on_one_worker, fire_in_one_turn
from tests.faults.harness import SEED_ITEMS, Harness
from tests.faults.ledger import Ledger, audit
from tests.faults.load import Attempt, Load, Recorder, post_visit, timed
from tests.faults.report import Check, Row
from tests.support.postgres import ROW_LOCK, TABLE_LOCK, LockHolder, log_since

POOL_WAIT_DETAIL = "no database connection available in time"
QUEUE_FULL_DETAIL = "too many requests waiting for the database"
TOO_SLOW_DETAIL = "the database did not answer in time"


@dataclass
class Phase:
    """One fault's run: its clocks, its records, its own checks and notes."""

    harness: Harness
    name: str
    recorder: Recorder
    ledger: Ledger
    items: list[int]  # items this phase writes to (the first `reserved` kept from the load)
    load: Load | None = None  # the steady load, for faults that pause it
    fault_at: float | None = None
    cleared_at: float | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fault(self) -> None:
        self.fault_at = time.monotonic()

    def cleared(self) -> None:
        self.cleared_at = time.monotonic()

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, bool(ok), detail))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def client(self, url: str | None = None, connections: int = 100) -> httpx.Client:
        return httpx.Client(
            base_url=url or self.harness.lb_url,
            timeout=self.harness.tuning.client_timeout,
            limits=httpx.Limits(max_connections=connections),
        )

    def since_fault(self) -> float:
        assert self.fault_at is not None
        return time.monotonic() - self.fault_at

    def pause_load(self) -> None:
        """No client traffic from here on (only haproxy's health checks) until
        `resume_load`; checked, since a fault without traffic claims it."""
        assert self.load is not None
        self.check("the load paused before the fault", self.load.pause())

    def resume_load(self) -> None:
        assert self.load is not None
        self.load.resume()


FaultRun = Callable[[Phase], None]


@dataclass(frozen=True)
class Fault:
    """A named fault, what it claims, and the errors clients may see while it lasts."""

    name: str
    description: str
    run: FaultRun
    # 503 from the service, or from haproxy itself when no replica passes /readyz (a
    # 503 too, counted apart in the report); anything else fails the row.
    allowed_errors: frozenset[str] = frozenset({"503", "503(lb)"})
    reserved_items: int = 0  # items the steady load leaves alone (for the fault's probes)
    pgbouncer_instances: int = 1  # the stack it needs: several run on a stack of their own


# ---- the phase ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How long each part of a phase lasts."""

    warmup: float = 2.0
    settle: float = 1.0  # load after recovery, to see it hold
    recover_within: float = 30.0
    ready_within: float = 30.0  # how long to ask every replica's /readyz after the fault
    streak: int = 20  # consecutive successes that count as recovered
    drain: float = 20.0
    threads: int = 6
    think: float = 0.01


def recovery_seconds(attempts: list[Attempt], cleared_at: float, streak: int) -> float | None:
    """From `cleared_at` to the first of `streak` consecutive successes (by start time).

    0 when the requests right after the fault cleared already succeed; None when no
    such streak was seen.
    """
    after = [a for a in attempts if a.started >= cleared_at and a.source == "load"]
    run = 0
    for i, attempt in enumerate(after):
        run = run + 1 if attempt.ok else 0
        if run == streak:
            first = i - streak + 1
            return 0.0 if first == 0 else after[first].started - cleared_at
    return None


def run_phase(harness: Harness, fault: Fault, timing: Timing | None = None) -> Row:
    """Run `fault` under steady load and audit what it did."""
    timing = timing or Timing()
    tuning = harness.tuning
    items = harness.new_items(8 + fault.reserved_items, fault.name)
    recorder, ledger = Recorder(), Ledger()
    phase = Phase(harness, fault.name, recorder, ledger, items)
    load = Load(
        harness.lb_url,
        recorder,
        ledger,
        write_items=items[fault.reserved_items :],
        read_ids=SEED_ITEMS,
        threads=timing.threads,
        think=timing.think,
        timeout=tuning.client_timeout,
    )
    phase.load = load
    load.start()
    ready: float | None = None
    try:
        time.sleep(timing.warmup)
        try:
            fault.run(phase)
        except Exception as exc:  # the row reports it; the next fault needs a healthy stack
            phase.check("the fault ran as planned", False, f"{type(exc).__name__}: {exc}")
            load.resume()
            repair(harness)
        load.resume()
        if phase.fault_at is None:
            phase.fault()
        if phase.cleared_at is None:
            phase.cleared()
        assert phase.cleared_at is not None
        cleared_at = phase.cleared_at
        if procs.wait_until(harness.every_replica_ready, timing.ready_within, interval=0.1):
            ready = max(0.0, time.monotonic() - cleared_at)
        procs.wait_until(
            lambda: recovery_seconds(recorder.attempts(), cleared_at, timing.streak) is not None,
            timing.recover_within,
            interval=0.1,
        )
        time.sleep(timing.settle)
    finally:
        load.stop(drain=timing.drain)
    try:
        harness.wait_healthy()
    except AssertionError as exc:  # the row says so; the next fault needs healthy replicas
        phase.check("haproxy sees every replica UP again after the fault", False, str(exc))
        phase.note(f"restarted to go on: {', '.join(restart_unready(harness)) or 'none'}")
    result = audit(harness.direct_url, ledger, items)
    attempts = recorder.attempts()
    assert phase.fault_at is not None
    describe(phase, attempts, tuning.bound)
    return Row(
        fault=fault.name,
        description=fault.description,
        requests=len(attempts),
        errors=dict(recorder.errors()),
        allowed_errors=sorted(fault.allowed_errors),
        acknowledged=result.acknowledged,
        retried=result.retried,
        replayed=result.replayed,
        lost=result.lost,
        duplicated=result.duplicated,
        unresolved=result.unresolved,
        over_bound=sum(1 for a in attempts if a.elapsed > tuning.bound),
        max_latency=max((a.elapsed for a in attempts), default=0.0),
        recovery=recovery_seconds(attempts, cleared_at, timing.streak),
        ready=ready,
        fault_seconds=cleared_at - phase.fault_at,
        checks=phase.checks,
        notes=phase.notes,
    )


def describe(phase: Phase, attempts: list[Attempt], bound: float) -> None:
    """Checks and notes every phase gets: Retry-After, haproxy's own 503s, the slowest."""
    assert phase.fault_at is not None
    service_503 = [a for a in attempts if a.outcome == "503"]
    phase.check(
        "every 503 from the service carries Retry-After",
        all(a.retry_after for a in service_503),
        f"{sum(1 for a in service_503 if not a.retry_after)} of {len(service_503)} without",
    )
    lb_503 = [a for a in attempts if a.outcome == "503(lb)"]
    if lb_503:
        phase.note(
            f"{len(lb_503)} answers were haproxy's own 503 (every replica failed /readyz, so"
            f" haproxy had none UP), from {lb_503[0].started - phase.fault_at:+.2f} s to"
            f" {lb_503[-1].started - phase.fault_at:+.2f} s after the fault;"
            f" {sum(1 for a in lb_503 if a.retry_after)} of them with Retry-After"
        )
    details: dict[str, int] = {}
    for a in attempts:
        if not a.ok and a.detail:
            details[f"{a.outcome} {a.detail}"] = details.get(f"{a.outcome} {a.detail}", 0) + 1
    if details:
        phase.note("service errors: " + "; ".join(f"{k} x{v}" for k, v in details.items()))
    slowest = sorted(attempts, key=lambda a: a.elapsed, reverse=True)
    over = [a for a in slowest if a.elapsed > bound]
    for a in over[:3] or slowest[:1]:
        phase.note(
            f"{'over the bound' if a.elapsed > bound else 'slowest'}: {a.source} {a.kind}"
            f" {a.outcome} in {a.elapsed:.2f} s, started {a.started - phase.fault_at:+.2f} s"
            f" after the fault{f' ({a.detail})' if a.detail else ''}"
        )


def repair(harness: Harness) -> None:
    """Bring every part back after a fault that failed half-way."""
    harness.proxy.restore()
    stack = harness.stack
    if not stack.postgres().running():
        stack.postgres().start()
    harness.start_pgbouncer()
    with contextlib.suppress(psycopg.Error):
        harness.pgbouncer().admin("RESUME")
    for index in range(1, harness.tuning.replicas + 1):
        replica = harness.replica(index)
        if not replica.running():
            replica.start()
            replica.wait_ready()
    harness.wait_healthy()


def restart_unready(harness: Harness) -> list[str]:
    """Restart every replica whose /readyz does not answer 200; their names."""
    restarted = []
    for index in range(1, harness.tuning.replicas + 1):
        replica = harness.replica(index)
        if not replica.ready():
            replica.stop()
            replica.start()
            replica.wait_ready()
            restarted.append(replica.name)
    harness.wait_healthy()
    return restarted


# ---- PgBouncer ---------------------------------------------------------------------------


def pgbouncer_stopped(sig: signal.Signals, down_for: float = 1.0) -> FaultRun:
    """PgBouncer stopped by `sig`, down for `down_for` seconds, then started again."""

    def run(phase: Phase) -> None:
        phase.fault()
        took = phase.harness.signal_pgbouncer(sig)
        phase.note(f"PgBouncer exited {took:.2f} s after {sig.name}")
        time.sleep(down_for)
        phase.harness.start_pgbouncer()
        phase.cleared()

    return run


def pgbouncer_instance_killed(phase: Phase) -> None:
    """One of two PgBouncers SIGKILLed: the pools move to the survivor, which carries the
    load alone for a while; then the instance is started again.

    Recovery counts from the kill: nothing comes back, the survivor has to do.
    """
    harness = phase.harness
    tuning = harness.tuning
    before = {i: harness.app_clients(i) for i in (1, 2)}
    phase.note(f"app connections before: pgbouncer-1 {before[1]}, pgbouncer-2 {before[2]}")
    phase.fault()
    took = harness.signal_pgbouncer(signal.SIGKILL, index=2)
    phase.cleared()
    phase.note(f"pgbouncer-2 exited {took:.2f} s after SIGKILL")
    # Every pool's connections are on the survivor again: at least POOL_MIN per worker.
    least = tuning.replicas * tuning.workers * tuning.pool_min
    moved = procs.wait_until(lambda: harness.app_clients(1) >= least, 15.0, interval=0.1)
    phase.check(
        "the survivor holds every pool's connections",
        moved,
        f"pgbouncer-1 has {harness.app_clients(1)} app connections, want >= {least}",
    )
    if moved:
        phase.note(f"pools on pgbouncer-1 alone {phase.since_fault():.2f} s after the kill")
    # The survivor carries the load alone: a streak of answered requests, then the restart.
    alone_from = time.monotonic()

    def carried() -> bool:
        done = [a for a in phase.recorder.attempts() if a.started >= alone_from]
        return sum(1 for a in done if a.source == "load" and a.ok) >= 50

    phase.check("the survivor alone answers 50 requests", procs.wait_until(carried, 30.0, 0.05))
    harness.pgbouncer(2).start()
    phase.note(
        "pgbouncer-2 started again; pools reach it as they open new connections"
        " (libpq's random pick), not by moving the ones they hold"
    )


def pgbouncer_pause(phase: Phase) -> None:
    """PAUSE (waits for running queries), hold, RESUME: clients only wait."""
    hold = phase.harness.tuning.query_wait_timeout * 0.75
    bouncer = phase.harness.pgbouncer()
    paused = threading.Event()

    def pause() -> None:
        bouncer.admin("PAUSE")  # returns once no server connection is in use
        paused.set()

    phase.fault()
    thread = threading.Thread(target=pause, name="pause")
    thread.start()
    if not paused.wait(1.0):
        phase.note(f"PAUSE still waiting after 1 s: {pgbouncer_snapshot(phase.harness)}")
    paused.wait(30)
    phase.note(
        f"PAUSE returned after {phase.since_fault():.2f} s; held {hold:.1f} s"
        f" (query_wait_timeout {phase.harness.tuning.query_wait_timeout} s)"
    )
    time.sleep(hold)
    bouncer.admin("RESUME")
    thread.join(30)
    phase.cleared()


def pgbouncer_snapshot(harness: Harness) -> str:
    """Who holds PgBouncer's server connections, and what waits, as one line."""
    bouncer = harness.pgbouncer()
    servers = [
        f"{s['state']}{'+linked' if s['link'] else ''}" for s in bouncer.admin("SHOW SERVERS")
    ]
    clients = [
        f"{c['state']}{'+linked' if c['link'] else ''}"
        for c in bouncer.admin("SHOW CLIENTS")
        if c["state"] != "idle"
    ]
    with psycopg.connect(harness.direct_url, autocommit=True) as conn:
        backends = [
            f"{r[0]}:{r[1] or '-'}:{(r[2] or '').split()[0] if r[2] else ''}"
            for r in conn.execute(
                "SELECT state, wait_event, query FROM pg_stat_activity"
                " WHERE usename = current_user AND pid <> pg_backend_pid()"
            ).fetchall()
        ]
    return f"servers {servers}; clients {clients}; backends {backends}"


def pgbouncer_reload(phase: Phase) -> None:
    """The config rewritten and RELOADed, three times, under load."""
    bouncer = phase.harness.pgbouncer()
    phase.fault()
    for _ in range(3):
        bouncer.write_config()
        bouncer.admin("RELOAD")
        time.sleep(0.5)
    phase.cleared()


def pgbouncer_flapping(times: int = 5, within: float = 20.0) -> FaultRun:
    """PgBouncer killed (SIGKILL) and started again `times` times within `within` seconds.

    Each cycle: killed, down until some replica's /readyz says so (the outage was seen),
    started (and answering its console), up until every replica is ready again; the
    fault clears when the last start returns. Each wait is on the service's own answer,
    bounded by a cycle's share of `within`.
    """

    def run(phase: Phase) -> None:
        h = phase.harness
        cycle = within / times
        replicas = range(1, h.tuning.replicas + 1)

        def seen() -> bool:
            return any(procs.http_status(f"{h.replica(i).url}/readyz") != 200 for i in replicas)

        phase.fault()
        for n in range(times):
            h.signal_pgbouncer(signal.SIGKILL)
            procs.wait_until(seen, cycle, interval=0.05)
            h.start_pgbouncer()
            if n < times - 1:
                procs.wait_until(lambda: h.every_replica_ready(streak=1), cycle, interval=0.05)
        phase.cleared()
        phase.check(
            f"{times} kills and restarts within {within:.0f} s",
            phase.since_fault() <= within,
            f"took {phase.since_fault():.1f} s",
        )

    return run


def outage_for(reconnect_timeout: float) -> float:
    """How long an outage `past the reconnect timeout` lasts: twice it, or 30 s past it
    when that is shorter (the long variants: 330 s for psycopg_pool's 300 s)."""
    return min(2 * reconnect_timeout, reconnect_timeout + 30.0)


def gave_up_lines(text: str) -> int:
    """psycopg_pool's warning when it stops retrying a connection, in a replica's log."""
    return len(re.findall(r"reconnection attempt in pool '[^']*' failed after", text))


def outage_past_reconnect(component: str) -> FaultRun:
    """`component` ("pgbouncer" or "postgres") down longer than POOL_RECONNECT_TIMEOUT,
    with no client traffic meanwhile (PgBouncer: until every replica's pools have given a
    connection up; PostgreSQL: `outage_for` the timeout): the load pauses before the
    fault and resumes when the component is back (accepting), so only haproxy's health
    checks reach the replicas while it is down. Recovery counts from the component being back.
    """

    def run(phase: Phase) -> None:
        h = phase.harness
        timeout = h.tuning.reconnect_timeout
        outage = outage_for(timeout)
        phase.pause_load()
        with contextlib.ExitStack() as logs:
            readers = [
                logs.enter_context(log_since(h.replica(i).log))
                for i in range(1, h.tuning.replicas + 1)
            ]
            phase.fault()
            if component == "pgbouncer":
                h.signal_pgbouncer(signal.SIGKILL)
            else:
                h.stack.postgres().stop(FAST)
            if component == "pgbouncer":
                # Down until every replica's pools have given a connection up: the
                # path this row is about, reached for certain (waited for, bounded).
                procs.wait_until(
                    lambda: all(gave_up_lines(read()) for read in readers),
                    outage + timeout + 60,
                    interval=0.25,
                )
                h.start_pgbouncer()
            else:
                # Behind PgBouncer the pools never give up (below), so the outage's
                # length is the fault itself: nothing to wait for.
                time.sleep(outage)
                h.stack.postgres().start()
            phase.note(
                f"{component} down for {phase.since_fault():.0f} s, no client traffic;"
                f" POOL_RECONNECT_TIMEOUT {timeout:g} s"
                f"{'' if h.tuning.pool_reconnect_timeout is not None else ' (the default)'}"
            )
            phase.cleared()
            phase.resume_load()
            gave_up = [gave_up_lines(read()) for read in readers]
        if component == "postgres":
            # Behind PgBouncer the pools keep their client connections (PgBouncer
            # accepts them with PostgreSQL down), so psycopg_pool never reaches its
            # reconnect timeout here: the row is about PostgreSQL itself staying away
            # longer than that, and everything coming back within 5 s.
            phase.note(f"pools that gave a connection up, per replica: {gave_up}")
            return
        # Without this the row could pass without reaching the path it is about: a
        # service that ignores POOL_RECONNECT_TIMEOUT retries for 300 s, and simply
        # reconnects once the component is back.
        phase.check(
            "every replica's pools reached the reconnect timeout during the outage",
            all(gave_up),
            f"psycopg_pool's 'reconnection attempt ... failed after' per replica: {gave_up}",
        )

    return run


# ---- PostgreSQL --------------------------------------------------------------------------


def postgres_restarted(mode: signal.Signals, down_for: float = 1.0) -> FaultRun:
    """PostgreSQL stopped (FAST: SIGINT, IMMEDIATE: SIGQUIT, no checkpoint), then started."""

    def run(phase: Phase) -> None:
        pg = phase.harness.stack.postgres()
        phase.fault()
        started = time.monotonic()
        pg.stop(mode)
        phase.note(f"PostgreSQL stopped {time.monotonic() - started:.2f} s after {mode.name}")
        time.sleep(down_for)
        started = time.monotonic()
        pg.start()
        phase.note(f"PostgreSQL accepting {time.monotonic() - started:.2f} s after start")
        phase.cleared()

    return run


# ---- the network -------------------------------------------------------------------------


def network_cut(hold: float = 2.0) -> FaultRun:
    """Every replica-to-PgBouncer connection reset, new ones refused, for `hold` seconds."""

    def run(phase: Phase) -> None:
        proxy = phase.harness.proxy
        before = proxy.stats.reset_by_cut
        phase.fault()
        proxy.cut()
        time.sleep(hold)
        proxy.restore()
        phase.cleared()
        reset = proxy.stats.reset_by_cut - before
        phase.check("the cut reset live connections", reset > 0, f"{reset} connections reset")

    return run


def network_blackhole(hold: float) -> FaultRun:
    """Nothing flows between replicas and PgBouncer for `hold` seconds; nothing is refused."""

    def run(phase: Phase) -> None:
        proxy = phase.harness.proxy
        held_before = proxy.stats.held_by_blackhole
        phase.fault()
        proxy.blackhole()
        time.sleep(hold)
        proxy.restore()
        phase.cleared()
        phase.note(
            f"{proxy.connections()} connections through the proxy;"
            f" {proxy.stats.held_by_blackhole - held_before} new ones held in the blackhole"
        )

    return run


# ---- pool pressure -----------------------------------------------------------------------


def pool_exhaustion(phase: Phase) -> None:
    """Every pool connection stuck behind a table lock, and a burst on top of the load.

    Requests that wait for a connection get 503 within POOL_TIMEOUT; those past
    POOL_MAX_WAITING get 503 at once; the stuck queries are cancelled by the
    statement timeout; once the lock goes, everything serves again. The burst reads
    pages, which never share a statement: reads by id that queue together would ride
    a few batches on a few connections (service/coalesce.py) instead of exhausting
    the pool (tests/unit/test_coalesce.py covers how a waiting batch times out).
    """
    h = phase.harness
    t = h.tuning
    burst_size = 10 * t.workers * t.replicas
    with LockHolder(h.direct_url, TABLE_LOCK) as lock:
        phase.fault()
        with phase.client(connections=burst_size) as http, ThreadPoolExecutor(burst_size) as pool:
            list(
                pool.map(
                    lambda i: timed(
                        http,
                        phase.recorder,
                        "GET",
                        f"/items?limit=1&after={i}",
                        source="burst",
                        kind="read",
                    ),
                    range(burst_size),
                )
            )
        # Hold until the statement timeout has cancelled what was stuck.
        time.sleep(max(0.0, t.statement_timeout + 0.5 - phase.since_fault()))
        phase.note(
            f"lock held {phase.since_fault():.2f} s; {lock.blocked()} backends still blocked"
        )
    phase.cleared()
    burst = [a for a in phase.recorder.attempts() if a.source == "burst"]
    waited = [a for a in burst if a.detail == POOL_WAIT_DETAIL]
    refused = [a for a in burst if a.detail == QUEUE_FULL_DETAIL]
    phase.note(
        f"burst of {burst_size}: {len(waited)} waited for a connection, {len(refused)} refused"
        f" at once, {sum(1 for a in burst if a.detail == TOO_SLOW_DETAIL)} cancelled,"
        f" {sum(1 for a in burst if a.ok)} served"
    )
    # The detail says which bound answered; the clock only says that the wait lasted
    # POOL_TIMEOUT and that nothing hung (t.margin: room for a busy 2-core machine).
    phase.check(
        "503 after waiting POOL_TIMEOUT for a connection",
        bool(waited)
        and all(0.8 * t.pool_timeout <= a.elapsed <= t.pool_timeout + t.margin for a in waited),
        f"{len(waited)} in {span(waited)} (POOL_TIMEOUT {t.pool_timeout} s)",
    )
    phase.check(
        "immediate 503 past POOL_MAX_WAITING",
        bool(refused) and all(a.elapsed < t.pool_timeout + t.margin for a in refused),
        f"{len(refused)} in {span(refused)}",
    )


def burst_one_turn(rounds: int = 3) -> FaultRun:
    """GET /items/{id} (a coalesced read) in bursts that land on one worker of replica 1
    in one turn of its event loop, with the load paused and the worker's pool idle.

    Each burst is POOL_MAX + POOL_MAX_WAITING requests: what the worker's checkout
    queue admits without refusing any (POOL_MAX hold a connection, POOL_MAX_WAITING
    wait), so not one may get the 503 for pool pressure, least of all with a pooled
    connection idle. tests/faults/burst.py says how the burst lands in one turn.
    """

    def run(phase: Phase) -> None:
        h = phase.harness
        t = h.tuning
        size = t.pool_max + t.pool_max_waiting
        replica = h.replica(1)
        phase.pause_load()
        with connections_on_one_worker(replica.port, h.worker_pids(1), size) as (worker, conns):

            def idle() -> float:
                return h.pool_gauges(1).get(worker, {}).get("pgscale_pool_connections_available", 0)

            phase.fault()
            for n in range(rounds):
                # The gauges are snapshots every POOL_STATS_INTERVAL: wait for one that
                # shows the worker's pool idle, with nothing waiting.
                quiet = procs.wait_until(lambda: idle() >= 1, 10, interval=0.2)
                before = h.pool_gauges(1).get(worker, {})
                phase.check(
                    f"burst {n + 1}: the worker's pool has an idle connection before it",
                    quiet,
                    _gauges(before),
                )
                ids = [1 + (n * size + i) % SEED_ITEMS for i in range(size)]
                answers = fire_in_one_turn(
                    worker, conns, [f"/items/{i}" for i in ids], phase.recorder
                )
                refused = [a for a in answers if a.status == 503]
                phase.check(
                    f"burst {n + 1}: {size} requests (POOL_MAX {t.pool_max} + POOL_MAX_WAITING"
                    f" {t.pool_max_waiting}) in one turn, none refused for pool pressure",
                    not refused and all(a.ok for a in answers),
                    f"answers {_statuses(answers)}; {len(refused)} 503"
                    f" ({', '.join(sorted({a.detail or '-' for a in refused})) or '-'})"
                    f" with {before.get('pgscale_pool_connections_available', 0):g} connection(s)"
                    " idle just before",
                )
        phase.cleared()
        phase.resume_load()

    return run


def _gauges(values: dict[str, float]) -> str:
    short = {
        "pgscale_pool_connections": "open",
        "pgscale_pool_connections_available": "idle",
        "pgscale_pool_connections_in_use": "in use",
        "pgscale_pool_requests_waiting": "waiting",
    }
    return ", ".join(f"{label} {values.get(name, 0):g}" for name, label in short.items())


def _statuses(attempts: list[Attempt]) -> str:
    counts: dict[str, int] = {}
    for a in attempts:
        counts[a.outcome] = counts.get(a.outcome, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def span(attempts: list[Attempt]) -> str:
    if not attempts:
        return "-"
    times = [a.elapsed for a in attempts]
    return f"{min(times):.2f}-{max(times):.2f} s"


def statement_timeout(phase: Phase) -> None:
    """A write stuck on a row lock past STATEMENT_TIMEOUT: cancelled, reported, not left running.

    The write is then retried with its key once the lock is gone, and lands once.
    """
    h = phase.harness
    t = h.tuning
    item = phase.items[0]  # reserved: the steady load does not write to it
    write = phase.ledger.new(item)
    with (
        log_since(h.stack.postgres().log) as postgres_log,
        LockHolder(h.direct_url, ROW_LOCK, (item,)) as lock,
        phase.client() as http,
    ):
        phase.fault()
        resp = post_visit(http, phase.recorder, phase.ledger, write, source="probe")
        elapsed = phase.since_fault()
        left_running = lock.blocked()
        lock.release()
        phase.cleared()
        phase.check(
            "the stuck write is answered 503 after STATEMENT_TIMEOUT, within DB_DEADLINE",
            resp is not None
            and resp.status_code == 503
            and bool(resp.headers.get("retry-after"))
            and t.statement_timeout * 0.9 <= elapsed < t.db_deadline,
            f"{resp.status_code if resp is not None else 'no answer'} after {elapsed:.2f} s"
            f" (STATEMENT_TIMEOUT {t.statement_timeout} s)",
        )
        phase.check(
            "the cancelled statement is not left running",
            left_running == 0,
            f"{left_running} backends still waiting on the lock after the 503",
        )
        deadline = time.monotonic() + 10
        while not write.acked and time.monotonic() < deadline:
            post_visit(http, phase.recorder, phase.ledger, write, source="probe")
            time.sleep(0.2)
        cancelled = "canceling statement due to statement timeout" in postgres_log()
    phase.check(
        "PostgreSQL reports the cancellation",
        cancelled,
        "'canceling statement due to statement timeout' in its log",
    )
    phase.check("the retried write lands", write.acked, f"after {write.attempts} attempts")


# ---- replicas and workers ----------------------------------------------------------------


def replica_sigterm(phase: Phase) -> None:
    """SIGTERM to replica 1 with requests in flight on it.

    In-flight writes are held on a row lock so they are certainly running when the
    signal lands; they must complete (201), the load balancer must send everything else
    to replica 2 without a single 5xx, and the replica comes back afterwards.
    """
    h = phase.harness
    replica = h.replica(1)
    master = h.replica_pid(1)
    item = phase.items[0]
    in_flight = 2  # of the worker's POOL_MAX 4: the load keeps its connections
    writes = [phase.ledger.new(item) for _ in range(in_flight)]
    answers: list[int | None] = []
    with (
        LockHolder(h.direct_url, ROW_LOCK, (item,)) as lock,
        phase.client(replica.url) as http,
        ThreadPoolExecutor(in_flight) as pool,
    ):
        futures = [
            pool.submit(post_visit, http, phase.recorder, phase.ledger, w, source="in-flight")
            for w in writes
        ]
        blocked = procs.wait_until(lambda: lock.blocked() >= in_flight, 5, interval=0.05)
        phase.check("writes in flight on the replica", blocked, f"{lock.blocked()} blocked")
        phase.fault()
        os.kill(master, signal.SIGTERM)
        time.sleep(1.0)  # the replica is draining; the load balancer must route around it
        lock.release()
        for future in futures:
            resp = future.result()
            answers.append(resp.status_code if resp is not None else None)
    exited = procs.wait_until(
        lambda: not procs.alive(master), h.tuning.graceful_timeout + 5, interval=0.05
    )
    phase.note(f"replica-1 exited {phase.since_fault():.2f} s after SIGTERM")
    phase.check("replica-1 exits", exited)
    phase.check(
        "in-flight requests complete",
        answers == [201] * in_flight,
        f"answers {answers}",
    )
    assert phase.fault_at is not None
    fault_at, restarted_at = phase.fault_at, time.monotonic()
    meanwhile = [
        a
        for a in phase.recorder.attempts()
        if a.source == "load" and fault_at <= a.started < restarted_at
    ]
    phase.check(
        "new requests go to the other replica meanwhile",
        bool(meanwhile) and all(a.ok for a in meanwhile),
        f"{sum(1 for a in meanwhile if a.ok)} of {len(meanwhile)} answered 2xx while replica-1"
        " drained and was down",
    )
    replica.start()
    replica.wait_ready()
    h.wait_healthy()
    phase.cleared()
    phase.note(f"replica-1 back and UP in haproxy {phase.since_fault():.2f} s after SIGTERM")


def worker_killed(phase: Phase) -> None:
    """SIGKILL to one uvicorn worker of replica 2: gunicorn replaces it, its metrics go."""
    h = phase.harness
    workers = h.worker_pids(2)
    victim = min(workers)
    before = h.metrics_pids(2)
    phase.check("the victim has metrics series", victim in before, f"pids {sorted(before)}")
    phase.fault()
    os.kill(victim, signal.SIGKILL)
    phase.cleared()  # the fault is the kill itself; recovery is gunicorn's

    def replaced() -> bool:
        now = h.worker_pids(2)
        return victim not in now and len(now) == len(workers)

    phase.check("gunicorn replaces the worker", procs.wait_until(replaced, 15, interval=0.05))
    phase.note(f"replacement worker running {phase.since_fault():.2f} s after the kill")
    newcomer = h.worker_pids(2) - workers

    def series_moved() -> bool:
        pids = h.metrics_pids(2)
        return victim not in pids and newcomer <= pids

    moved = procs.wait_until(series_moved, 15, interval=0.1)
    after = h.metrics_pids(2)
    phase.check(
        "its metrics series disappear, the replacement's appear",
        moved,
        f"pids before {sorted(before)}, after {sorted(after)}",
    )
    phase.note(f"metrics series replaced {phase.since_fault():.2f} s after the kill")


def worker_killed_during_outage(phase: Phase) -> None:
    """PgBouncer killed, then one worker of replica 2 SIGKILLed while it is down: the
    replacement starts in the outage (its pool cannot open) and must start not ready,
    or gunicorn's master stops the whole replica ("Worker failed to boot")."""
    h = phase.harness

    def down_by_pid() -> dict[int, float | None]:
        return {pid: g.get("pgscale_pool_database_down") for pid, g in h.pool_gauges(2).items()}

    def replica_down(expected: int) -> bool:
        down = down_by_pid()
        return len(down) == expected and all(value == 1 for value in down.values())

    workers = h.worker_pids(2)
    master = h.replica_pid(2)
    phase.fault()
    h.signal_pgbouncer(signal.SIGKILL)
    down = procs.wait_until(lambda: replica_down(len(workers)), 30, interval=0.1)
    phase.check("replica-2's workers find the path down", down, f"down by pid {down_by_pid()}")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    phase.note(f"worker {victim} SIGKILLed {phase.since_fault():.2f} s into the outage")

    def replaced_down() -> bool:
        now = h.worker_pids(2)
        return victim not in now and len(now) == len(workers) and replica_down(len(workers))

    # The replacement waits POOL_OPEN_TIMEOUT for its pool before it starts, down.
    opening = h.stack.service_settings().pool_open_timeout
    replaced = procs.wait_until(replaced_down, opening + 30, interval=0.1)
    phase.check(
        "the replacement starts during the outage, not ready",
        replaced,
        f"workers {sorted(h.worker_pids(2))}, down by pid {down_by_pid()}",
    )
    phase.note(f"replacement started down {phase.since_fault():.2f} s after the kill")
    h.start_pgbouncer()
    phase.cleared()
    phase.check("replica-2 still runs (its master)", procs.alive(master))


# ---- the catalogue -----------------------------------------------------------------------


def catalogue() -> list[Fault]:
    """Every fault of the full suite, in the order it runs (grouped by the stack each
    needs: see `Fault.pgbouncer_instances`)."""
    return [
        Fault(
            "pgbouncer-sigkill",
            "PgBouncer killed with SIGKILL, down 1 s, started again.",
            pgbouncer_stopped(signal.SIGKILL),
        ),
        Fault(
            "pgbouncer-sigterm",
            "PgBouncer 1.18 SIGTERM (immediate shutdown), down 1 s, started again.",
            pgbouncer_stopped(signal.SIGTERM),
        ),
        Fault(
            "pgbouncer-sigint",
            "PgBouncer 1.18 SIGINT (safe shutdown: PAUSE, then exit), down 1 s, started again.",
            pgbouncer_stopped(signal.SIGINT),
        ),
        Fault(
            "pgbouncer-pause",
            "PgBouncer PAUSE held below query_wait_timeout, then RESUME.",
            pgbouncer_pause,
        ),
        Fault(
            "pgbouncer-reload",
            "PgBouncer config rewritten and RELOADed three times.",
            pgbouncer_reload,
        ),
        Fault(
            "pgbouncer-flapping",
            "PgBouncer SIGKILLed and started again 5 times within 20 s, under load.",
            pgbouncer_flapping(),
        ),
        Fault(
            "pgbouncer-outage-quiet",
            "PgBouncer down until every pool gave up (past POOL_RECONNECT_TIMEOUT), no traffic.",
            outage_past_reconnect("pgbouncer"),
        ),
        Fault(
            "postgres-fast",
            "PostgreSQL fast shutdown (SIGINT), down 1 s, started again.",
            postgres_restarted(FAST),
        ),
        Fault(
            "postgres-immediate",
            "PostgreSQL immediate shutdown (SIGQUIT: crash recovery at start), down 1 s.",
            postgres_restarted(IMMEDIATE),
        ),
        Fault(
            "postgres-outage-quiet",
            "PostgreSQL down (fast) for twice POOL_RECONNECT_TIMEOUT, no client traffic.",
            outage_past_reconnect("postgres"),
        ),
        Fault(
            "network-cut",
            "Replica-to-PgBouncer connections reset and refused for 2 s (TCP proxy).",
            network_cut(2.0),
        ),
        Fault(
            "network-blackhole",
            "Replica-to-PgBouncer traffic silently dropped for 2 s, nothing refused.",
            network_blackhole(2.0),
        ),
        Fault(
            "network-blackhole-long",
            "Replica-to-PgBouncer traffic silently dropped for longer than DB_DEADLINE.",
            network_blackhole(6.0),
        ),
        Fault(
            "pool-exhaustion",
            "Every pool connection stuck behind a table lock, plus a burst of requests.",
            pool_exhaustion,
        ),
        Fault(
            "burst-one-turn",
            "Coalesced GET /items/{id} bursts into one worker in one event-loop turn.",
            burst_one_turn(),
        ),
        Fault(
            "statement-timeout",
            "A write stuck on a row lock beyond STATEMENT_TIMEOUT, then retried.",
            statement_timeout,
            reserved_items=1,
        ),
        Fault(
            "replica-sigterm",
            "SIGTERM to replica 1 with writes in flight on it; restarted afterwards.",
            replica_sigterm,
            allowed_errors=frozenset(),
            reserved_items=1,
        ),
        Fault(
            "worker-sigkill",
            "SIGKILL to one uvicorn worker of replica 2.",
            worker_killed,
            # The request the worker held dies with it: haproxy answers 502 or, on a
            # reused connection, closes the client's; a write is retried with its key.
            allowed_errors=frozenset({"503", "503(lb)", "502(lb)", "RemoteProtocolError"}),
        ),
        Fault(
            "worker-sigkill-during-outage",
            "PgBouncer killed, then one worker of replica 2 SIGKILLed while it is down;"
            " PgBouncer started once the replacement is up.",
            worker_killed_during_outage,
            # The killed worker's requests die with it (as in worker-sigkill).
            allowed_errors=frozenset({"503", "503(lb)", "502(lb)", "RemoteProtocolError"}),
        ),
        # On a stack of its own, after the others: two PgBouncers, no proxy.
        Fault(
            "pgbouncer-one-of-two-killed",
            "One of two PgBouncers SIGKILLed under load; the survivor carries it, then the"
            " instance comes back.",
            pgbouncer_instance_killed,
            pgbouncer_instances=2,
        ),
    ]


def long_catalogue() -> list[Fault]:
    """`make faults-long`: the outages past psycopg_pool's real 300 s reconnect timeout
    (run with POOL_RECONNECT_TIMEOUT unset), each about six minutes."""
    return [
        Fault(
            "pgbouncer-outage-long",
            "PgBouncer down until every pool gave up past the default 300 s, no traffic.",
            outage_past_reconnect("pgbouncer"),
        ),
        Fault(
            "postgres-outage-long",
            "PostgreSQL down 30 s past the default POOL_RECONNECT_TIMEOUT, no client traffic.",
            outage_past_reconnect("postgres"),
        ),
    ]


def by_name(names: list[str], faults: list[Fault] | None = None) -> list[Fault]:
    known = {f.name: f for f in (catalogue() if faults is None else faults)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]
