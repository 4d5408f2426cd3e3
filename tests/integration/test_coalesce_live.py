"""Coalescing against the real thing: requests that queue together share a statement
through PgBouncer, and each still gets exactly its own answer."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from infra.localstack import procs
from infra.localstack.replicas import Replica
from loadtests.bench import statement_totals
from service import sql
from tests.support.postgres import TABLE_LOCK, LockHolder
from tests.support.stack import Databases, StartService, make_items, requests_waiting

MISSING = 2**62  # no such item
# How long the queued requests may wait for the connection: ample time to see them all
# queued and let the lock go, and below the role's statement_timeout (5 s), which would
# otherwise end the first request's wait on the lock.
POOL_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def one_connection(start_service: StartService) -> Replica:
    """A worker with a single connection: whatever arrives while it is busy queues."""
    return start_service(pool_min=1, pool_max=1, pool_timeout=POOL_TIMEOUT, pool_stats_interval=0.1)


def queued_together(
    replica: Replica,
    databases: Databases,
    send: list[int],
    call: Callable[[int], httpx.Response],
) -> list[httpx.Response]:
    """Send every request while the items table is locked, so they all queue behind the
    first one, which holds the worker's only connection; then let them through.

    Nothing here waits a fixed time: the first request is on the connection once
    PostgreSQL shows it blocked on the lock, the rest are queued once the worker's
    waiting gauge counts every one of them."""
    with (
        ThreadPoolExecutor(max_workers=len(send)) as pool,
        LockHolder(databases.direct_url, TABLE_LOCK) as lock,
    ):
        first = pool.submit(call, send[0])
        assert lock.wait_blocked(1), "the first request never reached the lock"
        rest = [pool.submit(call, item) for item in send[1:]]
        queued = procs.wait_until(
            lambda: requests_waiting(replica) == len(rest), POOL_TIMEOUT, interval=0.05
        )
        lock.release()
        assert queued, f"{len(rest)} requests never all queued: {requests_waiting(replica)}"
        return [first.result(), *(f.result() for f in rest)]


@pytest.mark.slow
def test_reads_queued_together_share_a_statement_and_each_gets_its_own_item(
    one_connection: Replica, databases: Databases
) -> None:
    ids = make_items(one_connection.url, 10)
    asked = [*ids, *ids[:5], MISSING, MISSING]
    random.Random(7).shuffle(asked)
    before = statement_totals(one_connection.metrics_url, "items by id")
    with httpx.Client(base_url=one_connection.url, timeout=15) as http:
        answers = queued_together(
            one_connection, databases, asked, lambda i: http.get(f"/items/{i}")
        )
    for item_id, resp in zip(asked, answers, strict=True):
        if item_id == MISSING:
            assert resp.status_code == 404, resp.text
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["id"] == item_id

    # The worker's tally reaches its metrics on a stats beat: wait for every request.
    def counted() -> tuple[float, float]:
        after = statement_totals(one_connection.metrics_url, "items by id")
        count, total = (a - b for a, b in zip(after, before, strict=True))
        return count, total

    assert procs.wait_until(lambda: counted()[1] >= len(asked), 15), counted()
    count, total = counted()
    assert total == len(asked)  # every request counted once
    assert count == 2  # the first alone, then all the rest queued together: not 17 statements


@pytest.mark.slow
def test_visits_queued_together_each_get_their_own_visit_and_every_counter_adds_up(
    one_connection: Replica, databases: Databases
) -> None:
    items = make_items(one_connection.url, 4)
    asked = [items[0]] * 5 + [items[1]] * 3 + [items[2], MISSING]
    random.Random(3).shuffle(asked)
    with httpx.Client(base_url=one_connection.url, timeout=15) as http:
        answers = queued_together(
            one_connection, databases, asked, lambda i: http.post("/visits", json={"item_id": i})
        )
    visit_ids = []
    for item_id, resp in zip(asked, answers, strict=True):
        if item_id == MISSING:
            assert resp.status_code == 422, resp.text
            assert resp.json()["errors"][0]["field"] == "body.item_id"
        else:
            assert resp.status_code == 201, resp.text
            assert resp.json()["item_id"] == item_id
            visit_ids.append(resp.json()["id"])
    assert len(set(visit_ids)) == len(visit_ids) == len(asked) - 1  # one row per visit
    with psycopg.connect(databases.direct_url, autocommit=True) as conn:
        counters: dict[int, int] = dict(
            conn.execute("SELECT id, visits FROM items WHERE id = ANY(%s)", (items,)).fetchall()
        )
        rows: dict[int, int] = dict(
            conn.execute(
                "SELECT item_id, count(*) FROM visits WHERE item_id = ANY(%s) GROUP BY item_id",
                (items,),
            ).fetchall()
        )
    expected = Counter(i for i in asked if i != MISSING)
    assert counters == {i: expected[i] for i in items}
    assert rows == {i: n for i, n in expected.items()}


def test_batched_visits_lock_their_items_in_order_so_batches_never_deadlock(
    databases: Databases,
) -> None:
    """Overlapping batches from many connections: without the ordered lock (the control)
    they deadlock; with it (sql.RECORD_VISITS) none ever does."""

    def hammer(statement: str, attempts: int, stop_at_first: bool) -> tuple[int, int]:
        deadlocks, committed, stop = [0], [0], threading.Event()

        def writer(seed: int) -> None:
            rnd = random.Random(seed)
            with psycopg.connect(databases.direct_url, cursor_factory=psycopg.ClientCursor) as c:
                for _ in range(attempts):
                    if stop.is_set():
                        return
                    ids = [rnd.randint(1, 8) for _ in range(6)]
                    params = (ids,) if statement.count("%s") == 1 else (sorted(set(ids)), ids)
                    try:
                        with c.transaction():
                            c.execute(statement, params)
                        committed[0] += 1
                    except psycopg.errors.DeadlockDetected:
                        deadlocks[0] += 1
                        if stop_at_first:
                            stop.set()

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return deadlocks[0], committed[0]

    unordered = sql.RECORD_VISITS.split(";", 1)[1]  # the same write, minus the lock step
    deadlocks, _ = hammer(unordered, attempts=200, stop_at_first=True)
    assert deadlocks >= 1, "the control should deadlock: the test would prove nothing"
    deadlocks, committed = hammer(sql.RECORD_VISITS, attempts=50, stop_at_first=False)
    assert (deadlocks, committed) == (0, 300)
