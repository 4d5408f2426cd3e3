"""The fault suite's fast subset, inside `make test`: five faults, audited.

PgBouncer killed and restarted, the network to PgBouncer cut and restored, a replica
sent SIGTERM with writes in flight, one of two PgBouncers killed (on a stack of its
own): each under steady load through haproxy. And
PgBouncer down, with the load paused and only haproxy's health checks reaching the
replicas, until every replica's pools have given a connection up (POOL_RECONNECT_TIMEOUT
is 3 s here): every replica must be ready again within 5 s of PgBouncer's return. Every
acknowledged write is checked in PostgreSQL afterwards. The whole catalogue is
`python -m tests.faults` (`make faults`). Also here, cheaply: the proxy does what the
faults rely on, the audit does catch lost and doubled writes, and the Idempotency-Key
contract the load's retries rely on holds.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from infra.localstack import procs
from tests.faults.faults import Timing, by_name, run_phase
from tests.faults.harness import Harness, Tuning, fault_stack
from tests.faults.ledger import Ledger, Write, audit
from tests.faults.proxy import TcpProxy, port_refuses
from tests.faults.report import RECOVER_WITHIN, Row
from tests.faults.suite import durability

pytestmark = pytest.mark.slow

FAST = Timing(warmup=1.0, settle=0.5, streak=10, drain=15.0)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """The private stack (2 replicas x 2 workers) behind our proxy, for this module."""
    with fault_stack() as running:
        yield running


@pytest.mark.parametrize(
    "name", ["pgbouncer-sigkill", "network-cut", "replica-sigterm", "pgbouncer-outage-quiet"]
)
def test_fault_loses_nothing_and_never_hangs(harness: Harness, name: str) -> None:
    [fault] = by_name([name])
    assert_row_holds(run_phase(harness, fault, FAST))


def assert_row_holds(row: Row) -> None:
    context = f"{row.errors} {row.notes} {row.checks}"
    assert row.acknowledged >= 10, f"the load did not run: {context}"
    assert row.lost == 0, context
    assert row.duplicated == 0, context
    assert row.unresolved == 0, context
    assert row.over_bound == 0, context
    assert "500" not in row.errors
    assert not row.unexpected_errors, context
    assert row.recovery is not None, context
    assert row.recovery <= RECOVER_WITHIN, context
    assert row.ready is not None, f"some replica never ready again: {context}"
    assert row.ready <= RECOVER_WITHIN, context
    assert [c for c in row.checks if not c.ok] == []
    assert row.ok


def test_postgres_runs_durable(harness: Harness) -> None:
    """Acknowledged means on disk: the audit's claims need both settings on."""
    assert durability(harness) == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
    }


def test_idempotency_key_replays_and_refuses_a_changed_body(harness: Harness) -> None:
    items = harness.new_items(2, "idempotency")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    with httpx.Client(base_url=harness.lb_url, timeout=10) as http:
        first = http.post("/visits", json={"item_id": items[0]}, headers=key)
        again = http.post("/visits", json={"item_id": items[0]}, headers=key)
        changed = http.post("/visits", json={"item_id": items[1]}, headers=key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert changed.status_code == 422
    with psycopg.connect(harness.direct_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM visits WHERE item_id = ANY(%s)", (items,)
        ).fetchone()
    assert row == (1,)


def test_the_audit_catches_lost_and_doubled_writes(harness: Harness) -> None:
    """The checks behind lost = 0 and dup = 0 can fail: fake each fault, see it counted."""
    lost_item, doubled_item, mixed_item = harness.new_items(3, "audit")
    lost, doubled, mixed = Ledger(), Ledger(), Ledger()
    stored, ghost = lost.new(lost_item), lost.new(lost_item)
    once, other = doubled.new(doubled_item), mixed.new(mixed_item)
    with psycopg.connect(harness.direct_url, autocommit=True) as conn:

        def visit(item: int) -> int:
            row = conn.execute(
                "INSERT INTO visits (item_id) VALUES (%s) RETURNING id", (item,)
            ).fetchone()
            assert row is not None
            return int(row[0])

        def acknowledge(ledger: Ledger, write: Write, given: int, recorded: int) -> None:
            """The client was given `given`; the service's key record names `recorded`."""
            ledger.ack(write, given, replayed=False)
            conn.execute(
                "INSERT INTO idempotency_keys (key, scope, fingerprint, response)"
                " VALUES (%s, 'POST /visits', 'test', %s)",
                (write.key, Jsonb({"id": recorded})),
            )

        first = visit(lost_item)
        acknowledge(lost, stored, first, first)
        acknowledge(lost, ghost, 2**62, 2**62)  # acknowledged, yet nowhere in the table
        twice = visit(doubled_item)
        visit(doubled_item)  # a second row for the same key
        acknowledge(doubled, once, twice, twice)
        given = visit(mixed_item)
        acknowledge(mixed, other, given, given + 1)  # the service would replay another
    assert audit(harness.direct_url, lost, [lost_item]).lost == 1
    assert audit(harness.direct_url, lost, [lost_item]).duplicated == 0
    assert audit(harness.direct_url, doubled, [doubled_item]).extra_rows == 1
    assert audit(harness.direct_url, mixed, [mixed_item]).key_mismatches == 1


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo_through_proxy() -> Iterator[TcpProxy]:
    """An echo server behind a TcpProxy, both on free ports, both stopped after."""
    base = procs.free_port_block(2)
    server = socketserver.ThreadingTCPServer(("127.0.0.1", base), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with TcpProxy(base + 1, base) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    sock.settimeout(2)
    return sock


def test_proxy_cuts_blackholes_and_restores(echo_through_proxy: TcpProxy) -> None:
    proxy = echo_through_proxy
    with _connect(proxy.port) as live:
        live.sendall(b"ping")
        assert live.recv(16) == b"ping"

        proxy.cut()
        with pytest.raises(ConnectionResetError):
            live.recv(16)  # RST, not a quiet end of stream
        assert port_refuses(proxy.port)

    proxy.restore()
    with _connect(proxy.port) as held:
        held.sendall(b"one")
        assert held.recv(16) == b"one"
        proxy.blackhole()
        held.sendall(b"two")
        held.settimeout(0.5)
        with pytest.raises(TimeoutError):
            held.recv(16)
        with _connect(proxy.port) as newcomer:  # accepted, not refused, but silent
            newcomer.sendall(b"three")
            newcomer.settimeout(0.5)
            with pytest.raises(TimeoutError):
                newcomer.recv(16)
            proxy.restore()
            newcomer.settimeout(2)
            assert newcomer.recv(16) == b"three"
        held.settimeout(2)
        assert held.recv(16) == b"two"  # held, then delivered: as TCP would retransmit


def test_one_of_two_pgbouncers_killed_the_survivor_carries_the_load() -> None:
    """Last in the module, on a stack of its own: the replicas reach two PgBouncers."""
    [fault] = by_name(["pgbouncer-one-of-two-killed"])
    with fault_stack(Tuning(pgbouncer_instances=fault.pgbouncer_instances)) as two:
        row = run_phase(two, fault, FAST)
    assert_row_holds(row)
    assert any(c.name == "the survivor holds every pool's connections" for c in row.checks)
