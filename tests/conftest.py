"""A throwaway PostgreSQL and PgBouncer for the session, and real service processes.

Everything listens on 127.0.0.1 on free ports below the ephemeral range (so no client
socket can hold one), runs from a temporary directory, and is stopped by the pid
recorded at start, whether the tests pass or fail.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.localstack import certs, procs
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.postgres import Postgres
from infra.localstack.replicas import Replica
from tests.support.stack import (
    ADMIN_PASSWORD,
    APP,
    APP_PASSWORD,
    Databases,
    StartService,
    migrate,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test that starts gunicorn (through `start_service`, directly or by a
    fixture that uses it) without the `slow` marker, so `-m "not slow"` stays quick.
    Tests that start a whole stack, or restart servers, carry it too: no fixture
    tells those apart, so that half of the rule is kept by hand."""
    unmarked = [
        item.nodeid
        for item in items
        if "start_service" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these start gunicorn, so they must be marked slow: " + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A temporary directory the database's user can enter."""
    root = Path(tempfile.mkdtemp(prefix="pgscale-test-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def databases(scratch: Path) -> Iterator[Databases]:
    # One block below the ephemeral range: an ephemeral port (what free_port gives) can
    # be taken by any client socket on a loaded machine before the server binds it, or
    # while a test has the server stopped.
    port = procs.free_port_block(2)
    tls, _ = certs.for_servers(scratch / "tls", app_role=APP)
    pg = Postgres(scratch / "postgres", port, max_connections=60, tls=tls, app_role=APP)
    bouncer = PgBouncer(
        scratch / "pgbouncer",
        port + 1,
        pg.port,
        APP,
        users={APP: APP_PASSWORD},
        admin_password=ADMIN_PASSWORD,
        # Few server connections, so many client connections share each one: the
        # condition under which session state or prepared statements would break.
        default_pool_size=4,
        reserve_pool_size=0,
        max_db_connections=8,
        query_wait_timeout=2,
        server_login_retry=1,
        tls=tls,
    )
    try:
        pg.init()
        pg.start()
        pg.ensure_role(APP, APP_PASSWORD)
        pg.ensure_database(APP, APP)
        dbs = Databases(scratch, pg, bouncer)
        migrate(dbs.direct_url, seed=200)
        bouncer.start()
        yield dbs
    finally:
        bouncer.stop()
        pg.stop()


@pytest.fixture(scope="session")
def start_service(scratch: Path, databases: Databases) -> Iterator[StartService]:
    """Start real gunicorn replicas (settings as keyword arguments); all stop at the end.

    Each is waited for until ready, unless `ready=False` (it is to start not ready)."""
    started: list[Replica] = []
    counter = iter(range(1, 10_000))

    def start(*, ready: bool = True, **settings: object) -> Replica:
        env = {
            "DATABASE_URL": databases.pooled_url,
            "WORKERS": "1",
            "LOG_LEVEL": "info",
            # What the session's PgBouncer runs with, for the start-up checks.
            "PGBOUNCER_QUERY_WAIT_TIMEOUT": "2",
        }
        env.update({key.upper(): str(value) for key, value in settings.items()})
        # Two ports from below the ephemeral range: never the same one twice, and no
        # client socket can take them between choosing and binding.
        port = procs.free_port_block(2)
        replica = Replica(scratch / "replicas", next(counter), port, port + 1, env)
        started.append(replica)
        replica.start()
        if ready:
            replica.wait_ready()
        return replica

    try:
        yield start
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="session")
def service(start_service: StartService) -> Replica:
    """One replica with the default settings, shared by the API tests."""
    return start_service()


@pytest.fixture
def client(service: Replica) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=15) as http:
        yield http
