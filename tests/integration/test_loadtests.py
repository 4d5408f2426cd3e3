"""The Locust scenarios run against a real replica, with the connection sampler recording.

Each locustfile runs for a few seconds as its own `locust` process (Locust monkey-patches
the process with gevent, so never in this one), against a replica on the session's
PgBouncer; the sampler reads that PgBouncer's admin console and PostgreSQL directly.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.localstack import procs
from infra.localstack.config import REPO
from infra.localstack.replicas import Replica
from loadtests.common.sampling import COLUMNS, Probe, by_replica, replica_of
from tests.support.stack import Databases, StartService

pytestmark = pytest.mark.slow

LOCUST = [sys.executable, "-m", "locust"]
TIMEOUT = 60  # seconds any one Locust process may take before the test fails
POOL_MAX = 4  # the replica's pool; with 1 replica of 1 worker, the pools' capacity


@pytest.fixture(scope="module")
def target(start_service: StartService) -> Replica:
    """One replica of one worker (pool 2..4), for the load tests alone."""
    return start_service(pool_min=2, pool_max=POOL_MAX)


@pytest.fixture(scope="module")
def locust_env(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every Locust process: sampler DSNs and the stack's shape."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOCUST_", "LOADTEST_", "SAMPLER_"))
    }
    env.update(
        SAMPLER_PGBOUNCER_URL=databases.bouncer.admin_conninfo(),
        SAMPLER_POSTGRES_URL=databases.postgres.superuser_conninfo(),
        SAMPLER_INTERVAL="0.5",
        SAMPLER_CSV=str(tmp_path_factory.mktemp("default-csv") / "connections.csv"),
        SEED_ITEMS="200",  # what the session's migration seeded
        # The shape shapes.py sizes its stages against: 1 replica x 1 worker x POOL_MAX.
        REPLICAS="1",
        WORKERS="1",
        POOL_MIN="2",
        POOL_MAX=str(POOL_MAX),
        LOADTEST_STAGE_SECONDS="1",
    )
    return env


def locust(env: dict[str, str], *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCUST, "--only-summary", *args],
        env={**env, **overrides},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_no_failures(prefix: Path, result: subprocess.CompletedProcess[str]) -> None:
    """Requests were made, none failed, no task raised: Locust's own CSVs say so."""
    assert result.returncode == 0, result.stderr[-3000:]
    (total,) = [row for row in read_csv(Path(f"{prefix}_stats.csv")) if row["Name"] == "Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, read_csv(Path(f"{prefix}_failures.csv"))
    assert read_csv(Path(f"{prefix}_exceptions.csv")) == []
    assert "thresholds met" in result.stderr


def connection_samples(prefix: Path) -> list[dict[str, str]]:
    """The sampler's rows beside Locust's CSVs, checked for shape and plausibility."""
    path = Path(f"{prefix}_connections.csv")
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == list(COLUMNS)
    rows = read_csv(path)
    assert len(rows) >= 3, rows
    # PgBouncer saw the replica's pool as clients, PostgreSQL its server connections.
    assert max(int(row["cl_active"]) for row in rows) > 0
    assert max(int(row["pgb_clients"]) for row in rows) > 0
    assert max(int(row["pg_client_backends"]) for row in rows) > 0
    assert {int(row["pg_max_connections"]) for row in rows} == {60}
    return rows


@pytest.mark.parametrize("scenario", ["browse", "visits", "crud", "saturate"])
def test_scenario_runs_headless_and_samples_connections(
    scenario: str, target: Replica, locust_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = tmp_path / scenario
    result = locust(
        locust_env,
        *("-f", f"loadtests/{scenario}.py", "--headless", "-u", "8", "-r", "8", "-t", "4s"),
        *("--host", target.url, "--csv", str(prefix), "--max-fail-ratio", "0"),
    )
    assert_no_failures(prefix, result)
    rows = connection_samples(prefix)
    assert max(int(row["users"]) for row in rows) == 8
    assert any(f"{target.name}=" in row["pgb_clients_by_replica"] for row in rows)
    # Where the time went, per endpoint, beside Locust's own percentiles.
    timings = read_csv(Path(f"{prefix}_server_timing.csv"))
    assert timings, result.stderr[-2000:]
    for row in timings:
        assert int(row["Request Count"]) > 0
        assert float(row["db 50%"]) > 0, row  # every scenario's requests touch the database
        assert float(row["Locust 50%"]) > 0, row


@pytest.mark.parametrize(("scenario", "peak_users"), [("stages", 2 * POOL_MAX), ("spike", 16)])
def test_shape_runs_its_stages_past_pool_capacity(
    scenario: str, peak_users: int, target: Replica, locust_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = tmp_path / scenario
    result = locust(
        locust_env,
        *("-f", f"loadtests/{scenario}.py", "--headless", "--host", target.url),
        *("--csv", str(prefix), "--max-fail-ratio", "0"),
    )
    assert_no_failures(prefix, result)
    assert "Shape test completed" in result.stderr
    rows = connection_samples(prefix)
    assert max(int(row["users"]) for row in rows) == peak_users


def test_a_broken_threshold_fails_the_run(
    target: Replica, locust_env: dict[str, str], tmp_path: Path
) -> None:
    # 5 s, not 2: on a loaded machine Locust's start and the users' first waits can take
    # most of two seconds, and a run with no request fails for that reason instead.
    result = locust(
        locust_env,
        *("-f", "loadtests/browse.py", "--headless", "-u", "2", "-r", "2", "-t", "5s"),
        *("--host", target.url, "--csv", str(tmp_path / "x")),
        LOADTEST_MAX_P95_MS="0",  # no response is that fast
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no request was made" not in result.stderr, result.stderr[-3000:]
    assert "threshold broken: p95" in result.stderr
    assert "above --max-p95-ms 0" in result.stderr


def test_distributed_run_samples_on_the_master_only(
    target: Replica, locust_env: dict[str, str], tmp_path: Path
) -> None:
    port = str(procs.free_port_block(1))  # the master's, below the ephemeral range
    worker_csv = tmp_path / "worker_connections.csv"
    worker_args = ["-f", "loadtests/visits.py", "--worker", "--master-port", port]
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [*LOCUST, *worker_args, "--master-host", "127.0.0.1"],
            env={**locust_env, "SAMPLER_CSV": str(worker_csv)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        prefix = tmp_path / "master"
        result = locust(
            locust_env,
            *("-f", "loadtests/visits.py", "--master", "--expect-workers", "1"),
            *("--master-bind-host", "127.0.0.1", "--master-bind-port", port),
            *("--headless", "-u", "4", "-r", "4", "-t", "4s", "--host", target.url),
            *("--csv", str(prefix), "--max-fail-ratio", "0"),
        )
        worker.wait(timeout=TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert_no_failures(prefix, result)
    connection_samples(prefix)
    assert worker.returncode == 0, worker_log.read_text()[-3000:]
    assert not worker_csv.exists()
    assert "sampling connections" not in worker_log.read_text()


def test_sampler_keeps_going_when_a_database_does_not_answer(
    target: Replica, locust_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = tmp_path / "unreachable"
    closed = f"host=127.0.0.1 port={procs.free_port_block(1)} dbname=pgbouncer user=nobody"
    result = locust(
        locust_env,
        # 4 s, not 2: a loaded machine once finished the run with no request counted.
        *("-f", "loadtests/browse.py", "--headless", "-u", "2", "-r", "2", "-t", "4s"),
        *("--host", target.url, "--csv", str(prefix)),
        SAMPLER_PGBOUNCER_URL=closed,
    )
    assert_no_failures(prefix, result)
    assert result.stderr.count("PgBouncer does not answer") == 1
    rows = read_csv(Path(f"{prefix}_connections.csv"))
    assert len(rows) >= 3
    assert all(row["cl_active"] == "" for row in rows)
    assert all(int(row["pg_client_backends"]) > 0 for row in rows)


# ---- the sampler's reading, straight against the databases (no Locust here) ------------


@pytest.fixture
def probe(databases: Databases) -> Iterator[Probe]:
    probe = Probe(databases.bouncer.admin_conninfo(), databases.postgres.superuser_conninfo())
    try:
        yield probe
    finally:
        probe.close()


def test_probe_reads_pgbouncer_and_postgres(probe: Probe, target: Replica) -> None:
    bouncer, postgres = probe.read()
    assert bouncer is not None
    assert postgres is not None
    # The replica's one worker keeps POOL_MIN connections open to PgBouncer.
    assert bouncer["cl_active"] >= 2
    assert f"{target.name}=" in bouncer["pgb_clients_by_replica"]
    assert bouncer["pgb_clients"] > bouncer["cl_active"]  # our admin console connection too
    assert postgres["pg_max_connections"] == 60
    assert (
        postgres["pg_client_backends"]
        == postgres["pg_active"] + postgres["pg_idle"] + (postgres["pg_idle_in_transaction"])
    )


def test_probe_without_sources_reads_nothing() -> None:
    assert Probe(None, None).read() == (None, None)


def test_replicas_are_told_apart_by_application_name() -> None:
    assert replica_of("replica-2-4242") == "replica-2"
    assert replica_of("eu-api-7-99") == "eu-api-7"  # only the pid goes
    assert replica_of("psql") == "psql"
    assert replica_of("") == "(unnamed)"
    assert by_replica({"replica-2": 4, "replica-1": 8}) == "replica-1=8;replica-2=4"
