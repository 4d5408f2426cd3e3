"""Pool pressure never hangs a request: bounded waits, 503 with Retry-After, then recovery.

Each test makes the pressure real and waits for it on the server's own state: requests
stuck on a lock the test holds are counted by PostgreSQL (`LockHolder.blocked`), the
requests queued behind them by the worker's waiting gauge. Then it asserts the cause
of each answer (its problem detail, PostgreSQL's log, the service's counters) and
keeps the clock for lower bounds, which a slow machine cannot break, and for upper
bounds generous enough that only a hang would.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.replicas import Replica
from tests.support.postgres import ROW_LOCK, TABLE_LOCK, LockHolder, log_since
from tests.support.stack import (
    Databases,
    StartService,
    counter_total,
    make_items,
    requests_waiting,
)

pytestmark = pytest.mark.slow  # gunicorn replicas

DEADLINE = 3.0
STATEMENT_TIMEOUT = 1.5
# Room for a loaded machine above a bound: an answer later than this is a hang.
MARGIN = 5.0

POOL_WAIT_DETAIL = "no database connection available in time"
QUEUE_FULL_DETAIL = "too many requests waiting for the database"
TOO_SLOW_DETAIL = "the database did not answer in time"
CANCELLED = "canceling statement due to statement timeout"


def timed_get(http: httpx.Client, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = http.get(url)
    return resp, time.monotonic() - started


def page(n: int) -> str:
    """A page read: pages never share a statement, so each holds or waits on its own
    (reads by id that queue together ride one batch: service/coalesce.py)."""
    return f"/items?limit=1&after={n}"


def assert_unavailable(resp: httpx.Response, detail: str, retry_after: str) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == retry_after
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["detail"] == detail


# ---- a full pool, a full queue -----------------------------------------------------------

POOL_TIMEOUT = 2.0  # long enough to see the queue full while it waits
MAX_WAITING = 2


@pytest.fixture(scope="module")
def saturable(start_service: StartService) -> Replica:
    """One worker with two connections and two waiting places, its gauges fresh.

    The connections are held by reads stuck on a lock, which the role's statement_timeout
    (5 s, set by the migration) ends: the test lets the lock go well before that.
    """
    return start_service(
        pool_min=2,
        pool_max=2,
        pool_timeout=POOL_TIMEOUT,
        pool_max_waiting=MAX_WAITING,
        retry_after=2,
        pool_stats_interval=0.1,
    )


def test_saturated_pool_answers_503_within_the_wait_then_recovers(
    saturable: Replica, databases: Databases
) -> None:
    with (
        httpx.Client(base_url=saturable.url, timeout=30) as http,
        ThreadPoolExecutor(max_workers=4) as pool,
        LockHolder(databases.direct_url, TABLE_LOCK) as lock,
    ):
        holders = [pool.submit(timed_get, http, page(n)) for n in range(2)]
        assert lock.wait_blocked(2), "both connections should be stuck behind the lock"
        queued = [pool.submit(timed_get, http, page(n)) for n in range(2, 2 + MAX_WAITING)]
        full = procs.wait_until(
            lambda: requests_waiting(saturable) == MAX_WAITING, POOL_TIMEOUT, interval=0.05
        )
        assert full, f"{MAX_WAITING} requests should be waiting: {requests_waiting(saturable)}"
        # Both connections held and both places taken: the next one is refused at once.
        refused, refused_after = timed_get(http, page(9))
        waited = [f.result() for f in queued]
        lock.release()
        served = [f.result() for f in holders]

    assert_unavailable(refused, QUEUE_FULL_DETAIL, "2")
    assert refused_after < POOL_TIMEOUT, "refused without waiting for a connection"
    for resp, elapsed in waited:
        assert_unavailable(resp, POOL_WAIT_DETAIL, "2")
        assert POOL_TIMEOUT <= elapsed < POOL_TIMEOUT + MARGIN
    # The two that held the connections waited out the lock, and were served.
    assert [resp.status_code for resp, _ in served] == [200, 200]
    assert procs.wait_until(lambda: requests_waiting(saturable) == 0, 10)

    with httpx.Client(base_url=saturable.url, timeout=30) as http:
        statuses = [http.get(f"/items/{i}").status_code for i in make_items(saturable.url, 20)]
    assert statuses == [200] * 20


# ---- bounds on database work -------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(start_service: StartService) -> Replica:
    """One worker with two connections and short bounds on database work."""
    return start_service(
        pool_min=2,
        pool_max=2,
        statement_timeout=STATEMENT_TIMEOUT,
        db_deadline=DEADLINE,
        retry_after=2,
    )


def test_statement_timeout_cancels_a_blocked_write(tight: Replica, databases: Databases) -> None:
    (item,) = make_items(tight.url, 1)
    with (
        httpx.Client(base_url=tight.url, timeout=30) as http,
        log_since(databases.postgres.log) as postgres_log,
        LockHolder(databases.direct_url, ROW_LOCK, (item,)) as lock,
    ):
        started = time.monotonic()
        resp = http.post("/visits", json={"item_id": item})
        elapsed = time.monotonic() - started
        left_waiting = lock.blocked()
    assert_unavailable(resp, TOO_SLOW_DETAIL, "2")
    # PostgreSQL ended it (not our deadline), after it had waited on the lock that long.
    assert CANCELLED in postgres_log()
    assert STATEMENT_TIMEOUT * 0.9 <= elapsed < DEADLINE + MARGIN
    assert left_waiting == 0, "the cancelled statement must not wait on"
    assert httpx.post(f"{tight.url}/visits", json={"item_id": item}).status_code == 201


def test_deadline_bounds_a_read_stuck_behind_a_lock(tight: Replica, databases: Databases) -> None:
    """Reads carry no SET LOCAL; the per-request deadline bounds them."""
    before = counter_total(tight.metrics_url, "pgscale_db_deadline_exceeded")
    with (
        httpx.Client(base_url=tight.url, timeout=30) as http,
        log_since(databases.postgres.log) as postgres_log,
        LockHolder(databases.direct_url, TABLE_LOCK),
    ):
        resp, elapsed = timed_get(http, "/items/1")
    assert_unavailable(resp, TOO_SLOW_DETAIL, "2")
    # Our deadline ended it, not the role's statement_timeout (5 s) in PostgreSQL.
    assert counter_total(tight.metrics_url, "pgscale_db_deadline_exceeded") == before + 1
    assert CANCELLED not in postgres_log()
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + MARGIN
    with httpx.Client(base_url=tight.url, timeout=30) as http:
        (item,) = make_items(tight.url, 1)
        assert [http.get(f"/items/{item}").status_code for _ in range(5)] == [200] * 5


# ---- the waiting gauge -------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_connection(start_service: StartService) -> Replica:
    """One worker with one connection; queued requests wait up to 3 s, below the role's
    statement_timeout (5 s) that would end the first one's wait on the lock."""
    return start_service(pool_min=1, pool_max=1, pool_timeout=3, pool_stats_interval=0.1)


@pytest.mark.parametrize("by_id", [False, True], ids=["pages", "by-id"])
def test_requests_queued_for_a_connection_show_in_the_waiting_gauge(
    one_connection: Replica, databases: Databases, by_id: bool
) -> None:
    """Queued requests wait in the worker's CheckoutQueue (pages), or ride a batch queued
    there (reads by id: service/coalesce.py); the gauge must count every one of them."""
    (item,) = make_items(one_connection.url, 1)

    def url(n: int) -> str:
        return f"/items/{item}" if by_id else page(n)

    with (
        httpx.Client(base_url=one_connection.url, timeout=30) as http,
        ThreadPoolExecutor(max_workers=4) as pool,
        LockHolder(databases.direct_url, TABLE_LOCK) as lock,
    ):
        first = pool.submit(http.get, url(0))
        assert lock.wait_blocked(1), "the first request should hold the one connection"
        queued = [pool.submit(http.get, url(n)) for n in range(1, 4)]
        seen = procs.wait_until(lambda: requests_waiting(one_connection) == 3, 3, interval=0.05)
        lock.release()
        statuses = [f.result().status_code for f in [first, *queued]]
    assert seen, f"three requests queue behind the first: {requests_waiting(one_connection)}"
    assert statuses == [200] * 4  # the lock goes before POOL_TIMEOUT: all are served
