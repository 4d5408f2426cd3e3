"""PgBouncer's `server_login_retry` window: calls it refuses unsent are sent again.

A RECONNECT (or any RELOAD while server TLS is on) cuts short a server login in
progress; PgBouncer counts it as failed and, until a login succeeds, refuses at once
every client it has no server for (`server login has been failing`); it tries the next
login only `server_login_retry` seconds later. PostgreSQL is up all along, so the
service sends such calls again within DB_LOGIN_RETRY_WINDOW (service/db.py).

Here that race is made certain: a proxy between PgBouncer and PostgreSQL holds the one
login PgBouncer starts (its server connections retired first, so a request needs a new
one), RECONNECT cuts it short, and the proxy lets logins through again. Requests go
straight to a replica (a load balancer would take a replica out while /readyz fails):
one with the service's defaults, and the control, one with DB_LOGIN_RETRY_WINDOW=0,
whose requests get the refusal itself as a 503.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.replicas import Replica
from tests.faults.proxy import TcpProxy
from tests.support.stack import APP, Databases, StartService, counter_total, metric_samples

pytestmark = pytest.mark.slow  # gunicorn, and a PgBouncer of its own

REPEATED = "pgscale_db_login_refusals_repeated"
POOL_MIN = 3  # connections each worker holds, logged in: PgBouncer refuses these at once
# PgBouncer's server_login_retry: its refusal window. Longer than deployed (1 s), so a
# loaded machine cannot close it before the control's request arrives.
LOGIN_RETRY = 3
QUERY_WAIT_TIMEOUT = 8  # the request that started the login waits out the window
DEADLINE = 12.0  # DB_DEADLINE, above both
# POOL_TIMEOUT: a repeat needs a fresh connection, and PgBouncer holds new clients'
# logins until its next server login (the deployed 1 s is below the default of 2 s).
POOL_TIMEOUT = LOGIN_RETRY + 2.0
WINDOW = 6.0  # DB_LOGIN_RETRY_WINDOW: the window, a login, and slack


@pytest.fixture(scope="module")
def proxy(databases: Databases) -> Iterator[TcpProxy]:
    with TcpProxy(procs.free_port_block(1), databases.postgres.port) as running:
        yield running


@pytest.fixture(scope="module")
def own_bouncer(databases: Databases, proxy: TcpProxy) -> Iterator[PgBouncer]:
    """A PgBouncer of this module's own, reaching PostgreSQL through the proxy."""
    with databases.running_bouncer(
        "pgbouncer-login-refusals",
        upstream=proxy.port,
        server_login_retry=LOGIN_RETRY,
        query_wait_timeout=QUERY_WAIT_TIMEOUT,
    ) as bouncer:
        yield bouncer


def replica_on(start: StartService, bouncer: PgBouncer, **settings: object) -> Replica:
    replica = start(
        database_url=bouncer.app_conninfo(APP),
        pool_min=POOL_MIN,
        pool_max=POOL_MIN + 1,
        pgbouncer_query_wait_timeout=QUERY_WAIT_TIMEOUT,
        db_deadline=DEADLINE,
        pool_timeout=POOL_TIMEOUT,
        **settings,
    )
    assert procs.wait_until(
        lambda: (
            sum(metric_samples(replica.metrics_url, "pgscale_pool_connections").values())
            >= POOL_MIN
        ),
        30,
        interval=0.1,
    )
    return replica


@pytest.fixture(scope="module")
def replica(start_service: StartService, own_bouncer: PgBouncer) -> Replica:
    return replica_on(start_service, own_bouncer, db_login_retry_window=WINDOW)


@pytest.fixture(scope="module")
def never_repeats(start_service: StartService, own_bouncer: PgBouncer) -> Replica:
    return replica_on(start_service, own_bouncer, db_login_retry_window=0)


def pool(bouncer: PgBouncer) -> dict[str, int]:
    """The application database's row of SHOW POOLS: its server and client counts."""
    [row] = [r for r in bouncer.admin("SHOW POOLS") if r["database"] == APP]
    return {k: int(v) for k, v in row.items() if k.startswith(("sv_", "cl_"))}


def servers(bouncer: PgBouncer) -> int:
    counts = pool(bouncer)
    return sum(counts[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


class Call(threading.Thread):
    """One request in the background; its status and body once answered."""

    def __init__(self, url: str, method: str, path: str, body: object = None) -> None:
        super().__init__(daemon=True)
        self.request = (method, f"{url}{path}", body)
        self.status: int | None = None
        self.text = ""

    def run(self) -> None:
        method, url, body = self.request
        response = httpx.request(method, url, json=body, timeout=30)
        self.status, self.text = response.status_code, response.text[:300]


def login_cut_short(bouncer: PgBouncer, proxy: TcpProxy, replica: Replica) -> Call:
    """Open PgBouncer's refusal window with PostgreSQL up; returns the request whose
    query started the login that was cut short (it waits for the next one)."""
    bouncer.admin("RECONNECT")  # retire every server connection...
    assert procs.wait_until(lambda: servers(bouncer) == 0, 30, interval=0.1)  # ...gone
    proxy.blackhole()
    try:
        starter = Call(replica.url, "GET", "/items/1")
        starter.start()
        assert procs.wait_until(lambda: pool(bouncer)["sv_login"] == 1, 30, interval=0.05)
        bouncer.admin("RECONNECT")  # cuts the login short: PgBouncer counts it as failed
        assert servers(bouncer) == 0
    finally:
        proxy.restore()
    return starter


def test_calls_refused_while_a_login_was_cut_short_are_sent_again(
    own_bouncer: PgBouncer, proxy: TcpProxy, replica: Replica
) -> None:
    before = counter_total(replica.metrics_url, REPEATED)
    starter = login_cut_short(own_bouncer, proxy, replica)
    calls = [
        Call(replica.url, "GET", "/items/2"),
        Call(replica.url, "POST", "/visits", {"item_id": 1}),
    ]
    for call in calls:
        call.start()
    for call in (starter, *calls):
        call.join(60)
    assert [(c.status, c.text) for c in (starter, *calls)] == [
        (200, starter.text),
        (200, calls[0].text),
        (201, calls[1].text),
    ]
    # The cause: PgBouncer refused them, and the service sent them again.
    assert counter_total(replica.metrics_url, REPEATED) >= before + 1


def test_without_repeats_the_same_refusal_is_a_503(
    own_bouncer: PgBouncer, proxy: TcpProxy, never_repeats: Replica
) -> None:
    """The control: the window was open, and this is what a client saw without repeats
    (a write: a read found on a dead connection is repeated once anyway)."""
    starter = login_cut_short(own_bouncer, proxy, never_repeats)
    call = Call(never_repeats.url, "POST", "/visits", {"item_id": 1})
    call.start()
    for each in (starter, call):
        each.join(60)
    assert call.status == 503, call.text
    assert "the database is unavailable" in call.text
    assert counter_total(never_repeats.metrics_url, REPEATED) == 0
