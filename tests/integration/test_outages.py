"""PgBouncer goes away and comes back: readiness follows, requests fail fast, then recover."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from infra.localstack import procs
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.replicas import Replica
from service.pool import spoke_unasked
from tests.support.stack import APP, Databases, StartService, make_items, stopped

pytestmark = pytest.mark.slow  # gunicorn, and PgBouncer stopped and restarted

POOL_TIMEOUT = 1.0
MARGIN = 5.0  # room for a loaded machine above a bound, still below DB_DEADLINE (8 s)


@pytest.fixture(scope="module")
def own_bouncer(databases: Databases) -> Iterator[PgBouncer]:
    """A PgBouncer of this module's own, so stopping it disturbs no other test."""
    with databases.running_bouncer("pgbouncer-outage", server_login_retry=1) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def replica(start_service: StartService, own_bouncer: PgBouncer) -> Replica:
    # Four idle connections per worker: after a PgBouncer restart all four are dead.
    return start_service(
        database_url=own_bouncer.app_conninfo(APP),
        pool_timeout=POOL_TIMEOUT,
        pool_min=4,
        pool_max=4,
        workers=1,
    )


def status(url: str) -> int | None:
    return procs.http_status(url, timeout=10)


def test_readiness_follows_pgbouncer(replica: Replica, own_bouncer: PgBouncer) -> None:
    assert status(f"{replica.url}/readyz") == 200
    with stopped(own_bouncer):
        assert procs.wait_until(lambda: status(f"{replica.url}/readyz") == 503, 10)
        # Liveness never depends on the database.
        assert status(f"{replica.url}/healthz") == 200
        started = time.monotonic()
        resp = httpx.get(f"{replica.url}/items/1", timeout=30)
        elapsed = time.monotonic() - started
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.headers["content-type"] == "application/problem+json"
        # Ended by the bounded wait for a connection (or the failed connection itself),
        # not left to DB_DEADLINE (8 s) or hung; the bound leaves room for a slow machine.
        assert resp.json()["detail"] in {
            "no database connection available in time",
            "the database is unavailable",
        }
        assert elapsed < POOL_TIMEOUT + MARGIN
    assert procs.wait_until(lambda: status(f"{replica.url}/readyz") == 200, 20)
    # Connections that died with PgBouncer are replaced at checkout: no user sees them.
    ids = make_items(replica.url, 40)
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        statuses = [http.get(f"/items/{i}").status_code for i in ids]
    assert statuses == [200] * 40


def test_idle_connections_killed_behind_our_back_are_replaced(
    replica: Replica, own_bouncer: PgBouncer
) -> None:
    """PgBouncer restarted between two requests: the pool's checks hide it entirely."""
    ids = make_items(replica.url, 20)
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        assert http.get(f"/items/{ids[0]}").status_code == 200
        own_bouncer.stop()
        own_bouncer.start()
        first = http.get(f"/items/{ids[0]}")
        responses = [http.get(f"/items/{i}") for i in ids]
        # A write is never sent on an untested connection, so it survives a restart too.
        own_bouncer.stop()
        own_bouncer.start()
        write = http.post("/visits", json={"item_id": ids[0]})
    # All four idle connections died with PgBouncer. A checkout gives up after
    # POOL_TIMEOUT (1 s) with a 503, so a 200 means the dead ones were swept at once,
    # not tried one by one with psycopg_pool's backoff (service/db.py CheckAndSweep).
    # (The request's own elapsed time would add HTTP and the query to that, noise a
    # loaded machine can push past the second.)
    assert first.status_code == 200, first.text
    assert write.status_code == 201, write.text
    assert [r.status_code for r in responses] == [200] * 20


def test_a_connection_whose_server_hung_up_is_seen_without_a_round_trip(
    own_bouncer: PgBouncer,
) -> None:
    """The local test behind every fresh checkout: nothing to read means alive."""
    with psycopg.connect(own_bouncer.app_conninfo(APP), autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()
        assert not spoke_unasked(conn)
        with stopped(own_bouncer):
            assert procs.wait_until(lambda: spoke_unasked(conn), 5)
