"""Pool pressure never hangs a request: bounded waits, 503 with Retry-After, then recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import psycopg
import pytest

from infra.localstack.replicas import Replica
from tests.conftest import Databases, StartService, make_items, metric_samples

POOL_TIMEOUT = 0.5
DEADLINE = 3.0
STATEMENT_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def tight(start_service: StartService) -> Replica:
    """One worker with two connections, two waiting places, and short bounds."""
    return start_service(
        pool_min=2,
        pool_max=2,
        pool_timeout=POOL_TIMEOUT,
        pool_max_waiting=2,
        statement_timeout=STATEMENT_TIMEOUT,
        db_deadline=DEADLINE,
        retry_after=2,
    )


@contextmanager
def locked(databases: Databases, statement: str, hold: float) -> Iterator[None]:
    """Hold a lock straight on PostgreSQL for `hold` seconds (in a thread), then release."""
    ready = threading.Event()

    def holder() -> None:
        with psycopg.connect(databases.direct_url) as conn:
            conn.execute(statement)
            ready.set()
            time.sleep(hold)
            conn.rollback()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert ready.wait(5)
        yield
    finally:
        thread.join()


def timed_get(http: httpx.Client, url: str) -> tuple[int, float, httpx.Response]:
    started = time.monotonic()
    resp = http.get(url)
    return resp.status_code, time.monotonic() - started, resp


def test_saturated_pool_answers_503_within_the_wait_then_recovers(
    tight: Replica, databases: Databases
) -> None:
    (item,) = make_items(tight.url, 1)
    with httpx.Client(base_url=tight.url, timeout=30) as http:
        with (
            locked(databases, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE", hold=1.5),
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            results = list(pool.map(lambda _: timed_get(http, f"/items/{item}"), range(8)))

        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        # Those that got one of the two connections (alone, or sharing its statement
        # with a request that arrived in the same turn) waited out the lock.
        assert len(ok) >= 2, results
        assert all(elapsed > 1.0 for _, elapsed, _ in ok), results
        assert len(ok) + len(refused) == 8
        for _, elapsed, resp in refused:
            assert resp.headers["retry-after"] == "2"
            assert resp.headers["content-type"] == "application/problem+json"
            assert elapsed < POOL_TIMEOUT + 0.5
        immediate = [r for r in refused if r[1] < POOL_TIMEOUT * 0.6]
        waited = [r for r in refused if r[1] >= POOL_TIMEOUT * 0.8]
        assert immediate, "requests beyond POOL_MAX_WAITING are refused at once"
        assert waited, "queued requests give up after POOL_TIMEOUT"
        assert {r[2].json()["detail"] for r in immediate} == {
            "too many requests waiting for the database"
        }
        assert {r[2].json()["detail"] for r in waited} == {
            "no database connection available in time"
        }

        statuses = [http.get(f"/items/{i}").status_code for i in make_items(tight.url, 20)]
        assert statuses == [200] * 20


def test_statement_timeout_cancels_a_blocked_write(tight: Replica, databases: Databases) -> None:
    with (
        httpx.Client(base_url=tight.url, timeout=30) as http,
        locked(
            databases, "SELECT * FROM items WHERE id = 3 FOR UPDATE", hold=STATEMENT_TIMEOUT + 2
        ),
    ):
        started = time.monotonic()
        resp = http.post("/visits", json={"item_id": 3})
        elapsed = time.monotonic() - started
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "2"
        assert STATEMENT_TIMEOUT * 0.9 <= elapsed < DEADLINE
        with psycopg.connect(databases.direct_url, autocommit=True) as conn:
            running = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE '%%INSERT INTO visits%%' AND state = 'active'"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        assert running == (0,), "the cancelled statement must not run on"
    assert httpx.post(f"{tight.url}/visits", json={"item_id": 3}).status_code == 201


def test_deadline_bounds_a_read_stuck_behind_a_lock(tight: Replica, databases: Databases) -> None:
    """Reads carry no SET LOCAL; the per-request deadline bounds them."""
    with (
        httpx.Client(base_url=tight.url, timeout=30) as http,
        locked(databases, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE", hold=DEADLINE + 1.5),
    ):
        status, elapsed, resp = timed_get(http, "/items/1")
        assert status == 503
        assert resp.json()["detail"] == "the database did not answer in time"
        assert DEADLINE * 0.9 <= elapsed < DEADLINE + 1.0
    with httpx.Client(base_url=tight.url, timeout=30) as http:
        (item,) = make_items(tight.url, 1)
        assert [http.get(f"/items/{item}").status_code for _ in range(5)] == [200] * 5


def test_requests_queued_for_a_connection_show_in_the_waiting_gauge(
    start_service: StartService, databases: Databases
) -> None:
    """Queued requests wait in the worker's CheckoutQueue, or ride a batch queued there
    (service/coalesce.py); the gauge must count every one of them."""
    replica = start_service(pool_min=1, pool_max=1, pool_timeout=2, pool_stats_interval=0.2)
    (item,) = make_items(replica.url, 1)
    seen: list[float] = []
    with (
        httpx.Client(base_url=replica.url, timeout=30) as http,
        locked(databases, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE", hold=1.5),
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        waiting = [pool.submit(http.get, f"/items/{item}")]
        time.sleep(0.2)  # it holds the one connection, stuck behind the lock
        waiting += [pool.submit(http.get, f"/items/{item}") for _ in range(3)]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            waiting_now = metric_samples(replica.metrics_url, "pgscale_pool_requests_waiting")
            seen.append(sum(waiting_now.values()))
            time.sleep(0.1)
        statuses = [f.result().status_code for f in waiting]
    assert max(seen) == 3, seen  # one request holds the connection, three queue
    assert statuses == [200] * 4  # the lock goes before POOL_TIMEOUT: all are served
