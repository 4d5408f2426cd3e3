"""`make up/status/down` end to end: the local stack in a scratch directory on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.certs import TlsFiles
from infra.localstack.config import REPO, private_settings
from infra.localstack.pgbouncer import PgBouncer

pytestmark = pytest.mark.slow  # make up/status/down of a whole stack


@pytest.fixture(scope="module")
def stack_env(scratch: Path) -> Iterator[dict[str, str]]:
    root = scratch / "stack"
    env = {
        **os.environ,
        "STACK_DIR": str(root),
        "REPLICAS": "2",
        "WORKERS": "1",
        "POOL_MIN": "1",
        "POOL_MAX": "2",
        "SEED_ITEMS": "50",
    }
    # Every port from one block below the ephemeral range, the way private stacks get
    # theirs: separate picks could overlap, and a client socket can take an ephemeral port.
    settings, _ = private_settings(root, most_replicas=3, most_pgbouncers=2)
    for name in (
        "lb_port",
        "replica_base_port",
        "metrics_base_port",
        "pgbouncer_port",
        "postgres_port",
        "prometheus_port",
        "pgbouncer_exporter_port",
        "postgres_exporter_port",
        "process_exporter_port",
    ):
        env[name.upper()] = str(getattr(settings, name))
    try:
        yield env
    finally:
        stack(env, "down")


def stack(env: dict[str, str], command: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.localstack", command],
        env={**env, **extra},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def pids(env: dict[str, str]) -> dict[str, int | None]:
    root = Path(env["STACK_DIR"])
    return {path.stem: procs.read_pid(path) for path in sorted(root.rglob("*.pid"))}


def test_up_serves_through_the_load_balancer(stack_env: dict[str, str]) -> None:
    up = stack(stack_env, "up")
    assert up.returncode == 0, up.stderr
    lb = f"http://127.0.0.1:{stack_env['LB_PORT']}"
    assert f"API          {lb}" in up.stdout
    with httpx.Client(base_url=lb, timeout=10) as http:
        assert http.get("/items/1").json()["id"] == 1
        assert [http.get(f"/items/{i}").status_code for i in range(1, 51)] == [200] * 50


def test_status_shows_transaction_pooling(stack_env: dict[str, str]) -> None:
    status = stack(stack_env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "transaction" in status.stdout
    for column in ("pool_mode", "cl_active", "cl_waiting", "sv_active", "sv_idle"):
        assert column in status.stdout
    assert "client backends:" in status.stdout
    assert status.stdout.count("ready") >= 2


def test_up_again_is_harmless(stack_env: dict[str, str]) -> None:
    before = pids(stack_env)
    again = stack(stack_env, "up")
    assert again.returncode == 0, again.stderr
    assert pids(stack_env) == before


def test_up_with_fewer_replicas_rescales_in_place(stack_env: dict[str, str]) -> None:
    before = pids(stack_env)
    smaller = stack(stack_env, "up", REPLICAS="1")
    assert smaller.returncode == 0, smaller.stderr
    after = pids(stack_env)
    assert "replica-2" not in after
    assert not procs.alive(before["replica-2"])
    assert after["replica-1"] == before["replica-1"]
    assert after["postgres"] == before["postgres"]
    lb = f"http://127.0.0.1:{stack_env['LB_PORT']}"
    assert [httpx.get(f"{lb}/items/{i}").status_code for i in range(1, 11)] == [200] * 10


def clients_by_instance(env: dict[str, str], instances: int) -> dict[str, int]:
    """App client connections on each PgBouncer instance (SHOW CLIENTS)."""
    root = Path(env["STACK_DIR"])
    admin = (root / "secrets" / "pgbouncer_admin.password").read_text().strip()
    counts = {}
    for index in range(1, instances + 1):
        port = int(env["PGBOUNCER_PORT"]) + index - 1
        tls = TlsFiles(root / "secrets")  # the stack's, made by `make up`
        bouncer = PgBouncer(root / "pgbouncer", port, 0, "app", admin_password=admin, tls=tls)
        clients = bouncer.admin("SHOW CLIENTS")
        counts[f"pgbouncer-{index}"] = sum(1 for c in clients if c["database"] == "app")
    return counts


def test_up_with_two_pgbouncers_spreads_the_pools_and_shrinks_back(
    stack_env: dict[str, str],
) -> None:
    """Every pool connection lands on one of the instances; shrinking drains the other."""
    before = pids(stack_env)
    grown = stack(stack_env, "up", REPLICAS="1", PGBOUNCER_INSTANCES="2")
    assert grown.returncode == 0, grown.stderr
    assert "pgbouncer-2" in grown.stdout
    status = stack(stack_env, "status", REPLICAS="1", PGBOUNCER_INSTANCES="2")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("pgbouncer-1", "pgbouncer-2"):
        assert f"{name}  up on" in status.stdout
    after = pids(stack_env)
    assert after["pgbouncer-1"] == before["pgbouncer-1"], "the first instance stays up"
    # One replica of one worker, POOL_MIN=1..POOL_MAX=2: its connections are on one
    # instance or the other. libpq's random pick cannot be forced, so the test asserts
    # the sum, not the split (the sweep measures the split over many connections).
    assert 1 <= sum(clients_by_instance(stack_env, 2).values()) <= 2
    lb = f"http://127.0.0.1:{stack_env['LB_PORT']}"
    assert [httpx.get(f"{lb}/items/{i}").status_code for i in range(1, 11)] == [200] * 10

    shrunk = stack(stack_env, "up", REPLICAS="1", PGBOUNCER_INSTANCES="1")
    assert shrunk.returncode == 0, shrunk.stderr
    assert "pgbouncer-2  stopping" in shrunk.stdout
    assert "pgbouncer-2" not in pids(stack_env)
    assert not procs.alive(after["pgbouncer-2"])
    assert 1 <= clients_by_instance(stack_env, 1)["pgbouncer-1"] <= 2
    assert [httpx.get(f"{lb}/items/{i}").status_code for i in range(1, 11)] == [200] * 10


def test_a_taken_port_is_a_clear_error(stack_env: dict[str, str]) -> None:
    before = pids(stack_env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = stack(stack_env, "up", REPLICAS="3", REPLICA_BASE_PORT=str(port))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use; set REPLICA_BASE_PORT" in result.stderr
    assert pids(stack_env) == before, "a refused change touches nothing"


def test_down_stops_everything_it_started(stack_env: dict[str, str]) -> None:
    before = pids(stack_env)
    down = stack(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert pids(stack_env) == {}
    assert not any(procs.alive(pid) for pid in before.values())
    status = stack(stack_env, "status")
    assert status.returncode == 1
