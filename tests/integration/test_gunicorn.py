"""The real gunicorn with two uvicorn workers, each holding its own small pool."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from infra.localstack import procs
from tests.support.stack import APP, Databases, StartService, make_items


@pytest.mark.slow
def test_two_workers_each_open_their_own_pool(
    start_service: StartService, databases: Databases
) -> None:
    replica = start_service(workers=2, pool_min=3, pool_max=3, replica_name="gunicorn-test")

    def pool_clients() -> dict[str, int]:
        counts: dict[str, int] = {}
        for client in databases.bouncer.admin("SHOW CLIENTS"):
            name = client["application_name"]
            if name.startswith("gunicorn-test-"):
                counts[name] = counts.get(name, 0) + 1
        return counts

    # Each worker names its pool after the replica and its pid.
    assert procs.wait_until(lambda: sorted(pool_clients().values()) == [3, 3], 10), pool_clients()
    ids = make_items(replica.url, 100)
    with httpx.Client(base_url=replica.url, timeout=10) as http, ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda i: http.get(f"/items/{ids[i % 100]}").status_code, range(400))
        )
    assert statuses == [200] * 400

    # At most W x P client connections into PgBouncer, whatever the load.
    assert sum(pool_clients().values()) == 6
    workers = {name.rsplit("-", 1)[1] for name in pool_clients()}
    assert len(workers) == 2


@pytest.mark.slow
def test_sigterm_stops_the_replica_and_closes_its_pools(
    start_service: StartService, databases: Databases
) -> None:
    replica = start_service(workers=2, pool_min=2, replica_name="sigterm-test")
    pid = procs.read_pid(replica.pid_file)

    def clients() -> int:
        return sum(
            1
            for c in databases.bouncer.admin("SHOW CLIENTS")
            if c["application_name"].startswith("sigterm-test-")
        )

    assert procs.wait_until(lambda: clients() == 4, 10)
    assert procs.stop(pid, signal.SIGTERM, timeout=30)
    assert procs.wait_until(lambda: clients() == 0, 5)
    assert "Traceback" not in replica.log.read_text()


@pytest.mark.slow
def test_a_replica_that_cannot_fit_the_budget_refuses_to_start(
    start_service: StartService,
) -> None:
    """One replica of 4 workers x 300 connections overflows max_client_conn 1000."""
    with pytest.raises(procs.StackError) as refused:
        start_service(workers=4, pool_min=1, pool_max=300, replicas=1)
    assert "this replica cannot fit the connection budget" in str(refused.value)
    assert "max_client_conn" in str(refused.value)


@pytest.mark.slow
def test_a_replica_whose_password_is_refused_fails_to_start(
    start_service: StartService, databases: Databases
) -> None:
    """A setting no retry can mend stops the replica at once, with the database's reason
    (a path that is down starts it not ready instead: tests/integration/test_recovery.py)."""
    right = databases.bouncer.users[APP]
    wrong = databases.pooled_url.replace(f":{right}@", ":not-the-password@")
    assert wrong != databases.pooled_url
    with pytest.raises(procs.StackError) as refused:
        start_service(database_url=wrong, pool_min=1, pool_open_timeout=2)
    assert "the database refuses these settings" in str(refused.value)
    assert "authentication failed" in str(refused.value)


@pytest.mark.slow
def test_a_declared_replica_count_that_overflows_is_a_warning(
    start_service: StartService,
) -> None:
    replica = start_service(workers=1, pool_min=1, pool_max=100, replicas=20)
    (item,) = make_items(replica.url, 1)
    assert httpx.get(f"{replica.url}/items/{item}").status_code == 200
    log = replica.log.read_text()
    assert "connection budget:" in log
    assert "at most 9 replicas of this shape fit" in log


def test_the_master_does_not_import_prometheus_client_before_its_directory_is_set() -> None:
    """prometheus_client picks multiprocess mode at import: too early, and metrics vanish."""
    import subprocess
    import sys

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, service.gunicorn_conf; print('prometheus_client' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


@pytest.mark.slow
def test_prepared_statements_behind_pgbouncer_without_tracking_refuse_to_start(
    start_service: StartService,
) -> None:
    with pytest.raises(procs.StackError) as refused:
        start_service(prepared_statements="true", pgbouncer_max_prepared_statements=0)
    assert "PREPARED_STATEMENTS=true needs PgBouncer >= 1.22" in str(refused.value)


@pytest.mark.slow
def test_the_service_logs_which_prepared_statement_mode_it_chose(
    start_service: StartService, databases: Databases
) -> None:
    off = start_service(replica_name="plain-test")
    assert "prepared statements off" in off.log.read_text()
    direct = start_service(
        replica_name="prepared-test",
        prepared_statements="true",
        via_pgbouncer="false",
        database_url=databases.direct_url,
    )
    with httpx.Client(base_url=direct.url) as http:
        (item,) = make_items(direct.url, 1)
        assert [http.get(f"/items/{item}").status_code for _ in range(20)] == [200] * 20
    assert "prepared statements on after 5 runs (direct to PostgreSQL)" in direct.log.read_text()


def test_the_preloaded_app_is_frozen_out_of_the_workers_collections() -> None:
    """A worker's full GC must not walk the imported app (tens of ms per collection)."""
    import subprocess
    import sys

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc, service.gunicorn_conf as conf, service.asgi;"
            " before = len(gc.get_objects(2)); conf.pre_fork(None, None);"
            " print(before, gc.get_freeze_count(), len(gc.get_objects(2)))",
        ],
        env={**os.environ, "METRICS_ENABLED": "false"},
        capture_output=True,
        text=True,
        check=True,
    )
    before, frozen, after = map(int, probe.stdout.split())
    assert frozen >= before > 50_000  # the app's objects, now out of reach of the GC
    assert after < 1_000
