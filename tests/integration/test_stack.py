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
from infra.localstack.config import REPO

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
    # One block below the ephemeral range: three replica ports (the test grows to
    # three), three for their metrics, then the load balancer, PgBouncer, PostgreSQL.
    # Separate picks could overlap, and a client socket can take an ephemeral port.
    base = procs.free_port_block(9)
    env["REPLICA_BASE_PORT"], env["METRICS_BASE_PORT"] = str(base), str(base + 3)
    for offset, variable in enumerate(("LB_PORT", "PGBOUNCER_PORT", "POSTGRES_PORT"), 6):
        env[variable] = str(base + offset)
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
