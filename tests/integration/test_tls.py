"""Who gets in, against a running stack with TLS on: each refusal with its own message.

Every refusal sits beside a control that gets in with one thing changed (the right
CA, the right password, PgBouncer's client certificate), so the test shows what
was refused, not that nothing could connect. Last, the server certificates rotate
under traffic with no failed request.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509

from infra.localstack import certs, procs
from infra.localstack.pgbouncer import ADMIN_USER
from infra.localstack.secrets import password
from infra.localstack.stack import APP_DATABASE, APP_ROLE, EXPORTER_ROLE, Stack
from tests.support.stack import running_stack

pytestmark = pytest.mark.slow  # a whole stack


@pytest.fixture(scope="module")
def stack(scratch: Path) -> Iterator[Stack]:
    # Two replicas, as deployed: one replica's readiness blip on a loaded machine must
    # not read as a refused request through the load balancer.
    with running_stack(
        scratch / "tls-stack",
        {"WORKERS": "1", "POOL_MIN": "1", "POOL_MAX": "2"},
        most_replicas=2,
        replicas=2,
        seed_items=20,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def other_ca(scratch: Path) -> Path:
    """A CA of another stack: valid certificates, just not ours."""
    files, _ = certs.ensure(scratch / "other-ca")
    return files.ca_cert


def conninfo(stack: Stack, port: int, user: str, dbname: str, **params: str) -> str:
    base = {
        "host": "127.0.0.1",
        "port": str(port),
        "user": user,
        "dbname": dbname,
        "password": password(stack.secrets, user),
        "connect_timeout": "5",
        **stack.client_tls(),
    }
    return psycopg.conninfo.make_conninfo(**{**base, **params})


def refusal(info: str) -> str:
    """The message of the refused connection (fails the test if it gets in)."""
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(info).close()
    return str(refused.value)


def gets_in(info: str) -> None:
    """Logs in (the admin console answers no SELECT, so a login is the proof)."""
    psycopg.connect(info, autocommit=True).close()


Server = Callable[..., str]


def bouncer(stack: Stack, user: str = APP_ROLE, dbname: str = APP_DATABASE, **params: str) -> str:
    return conninfo(stack, stack.settings.pgbouncer_port, user, dbname, **params)


def postgres(stack: Stack, user: str = EXPORTER_ROLE, **params: str) -> str:
    dbname = APP_DATABASE if user == APP_ROLE else "postgres"
    return conninfo(stack, stack.settings.postgres_port, user, dbname, **params)


def test_a_client_without_tls_is_refused_by_pgbouncer(stack: Stack) -> None:
    gets_in(bouncer(stack))
    assert "SSL required" in refusal(bouncer(stack, sslmode="disable"))


@pytest.mark.parametrize("user", [APP_ROLE, EXPORTER_ROLE])
def test_a_client_without_tls_is_refused_by_postgres(stack: Stack, user: str) -> None:
    message = refusal(postgres(stack, user, sslmode="disable"))
    assert f'no pg_hba.conf entry for host "127.0.0.1", user "{user}"' in message
    assert "no encryption" in message


@pytest.mark.parametrize("server", [bouncer, postgres])
def test_a_client_trusting_another_ca_is_refused(
    stack: Stack, other_ca: Path, server: Server
) -> None:
    gets_in(server(stack))
    assert "certificate verify failed" in refusal(server(stack, sslrootcert=str(other_ca)))


def test_a_server_name_outside_the_certificate_is_refused(stack: Stack) -> None:
    """verify-full checks the name, not only the chain: the certificate names no 127.0.0.2."""
    gets_in(bouncer(stack, host="localhost"))
    message = refusal(bouncer(stack, host="127.0.0.2", hostaddr="127.0.0.1"))
    assert 'does not match host name "127.0.0.2"' in message


@pytest.mark.parametrize("server", [bouncer, postgres])
def test_a_wrong_password_is_refused(stack: Stack, server: Server) -> None:
    message = refusal(server(stack, password="not-the-password"))
    assert "SASL authentication failed" in message or "password authentication failed" in message


def test_the_app_role_reaches_postgres_only_with_pgbouncers_certificate(stack: Stack) -> None:
    """A replica holds the password, not the client pair: it must go through PgBouncer."""
    assert "connection requires a valid client certificate" in refusal(postgres(stack, APP_ROLE))
    assert stack.tls is not None
    gets_in(postgres(stack, APP_ROLE, **stack.tls.libpq(client_cert=True)))


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("SELECT rolpassword FROM pg_authid", "permission denied for table pg_authid"),
        ("CREATE ROLE intruder", "permission denied to create role"),
        ("CREATE DATABASE intruder", "permission denied to create database"),
        ("CREATE SCHEMA intruder", "permission denied for database app"),
        ("CREATE TABLE pg_catalog.intruder (x int)", "permission denied for schema pg_catalog"),
        ("CREATE TEMPORARY TABLE intruder (x int)", "permission denied to create temporary tables"),
        ("DELETE FROM information_schema.sql_features", "permission denied for table sql_features"),
    ],
)
def test_the_app_role_cannot_leave_its_schema(stack: Stack, statement: str, message: str) -> None:
    with psycopg.connect(bouncer(stack), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM items")  # its own schema: allowed
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=message):
            conn.execute(statement)


def test_the_admin_console_refuses_the_app_role(stack: Stack) -> None:
    gets_in(bouncer(stack, user=ADMIN_USER, dbname="pgbouncer"))
    assert "not allowed" in refusal(bouncer(stack, dbname="pgbouncer"))


def test_replica_metrics_are_not_served_through_the_load_balancer(stack: Stack) -> None:
    replica = stack.replica(1)
    assert httpx.get(replica.metrics_url, timeout=10).status_code == 200
    lb = stack.haproxy().url
    assert httpx.get(f"{lb}/metrics", timeout=10).status_code == 404
    config = stack.haproxy().cfg.read_text()
    assert f":{stack.settings.replica_port(1)}" in config  # the control: it names replicas
    for index in (1, 2):
        assert f":{stack.settings.metrics_port(index)}" not in config


def served_serial(port: int, ca: Path) -> int:
    """The serial of the certificate a PostgreSQL-protocol server presents now.

    The protocol's SSLRequest, then a handshake verified against `ca`: what a new
    client would see, whatever older connections still use.
    """
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class Traffic:
    """Reads and writes through the load balancer, one after another, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    for response in (
                        http.get("/items/1"),
                        http.post("/visits", json={"item_id": 1}),
                    ):
                        self.statuses.append(response.status_code)
                        if response.status_code >= 400:
                            self.errors.append(f"{response.status_code} {response.text[:300]}")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_server_certificates_rotate_under_traffic_without_a_failed_request(stack: Stack) -> None:
    """New pairs on disk, PostgreSQL reloaded, then PgBouncer RELOADed: new handshakes get
    the new certificates, the RELOAD replaces every server connection with one that
    verified PostgreSQL's new certificate, and not one request fails."""
    tls = stack.tls
    assert tls is not None
    s = stack.settings
    ports = {"pgbouncer": s.pgbouncer_port, "postgres": s.postgres_port}
    before = {name: served_serial(port, tls.ca_cert) for name, port in ports.items()}
    bouncer_ = stack.pgbouncer()
    with Traffic(stack.haproxy().url) as traffic:
        assert procs.wait_until(lambda: len(traffic.statuses) >= 20, 30)
        old_servers = bouncer_.server_pids()
        assert old_servers  # the control: traffic holds server connections to replace
        certs.rotate(tls)
        assert {name: certs.serial(tls.cert(name)) for name in ports} != before
        stack.postgres().reload()
        assert procs.wait_until(
            lambda: served_serial(ports["postgres"], tls.ca_cert) != before["postgres"],
            30,
            interval=0.1,
        )
        # With server TLS on, a RELOAD also retires every server connection (PgBouncer
        # 1.18, sbuf.c): their successors verify PostgreSQL's new certificate.
        bouncer_.admin("RELOAD")

        def rotated() -> bool:
            fresh = bouncer_.server_pids()
            return (
                served_serial(ports["pgbouncer"], tls.ca_cert) != before["pgbouncer"]
                and bool(fresh)
                and not fresh & old_servers
            )

        assert procs.wait_until(rotated, 30, interval=0.2)
        seen = len(traffic.statuses)
        assert procs.wait_until(lambda: len(traffic.statuses) >= seen + 20, 30)
    assert traffic.errors == []
    assert set(traffic.statuses) == {200, 201}
    gets_in(bouncer(stack))
