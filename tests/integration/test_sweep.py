"""A two-cell mini sweep, and one direct cell that must fail where the budget says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.localstack.config import REPO
from loadtests.common.sampling import parse_counts
from loadtests.sweep.probes import parse_parts

pytestmark = pytest.mark.slow  # stacks, one per cell


def sweep(out: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.sweep", "--out", str(out), "--duration", "5", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (out / "summary.json").exists(), result.stdout + result.stderr
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["exit_code"] = result.returncode
    summary["stdout"] = result.stdout
    return summary


def test_mini_sweep_measures_exactly_the_predicted_client_connections(scratch: Path) -> None:
    """Two PgBouncers: the clients split between them, each holds its own small pool.

    The larger cell first: the smaller one must count only server connections of its own
    (PgBouncer keeps idle ones 60 s; the sweep closes them between cells)."""
    out = scratch / "sweep-pooled"
    summary = sweep(
        out, "--modes", "pgbouncer", "--workers", "2", "1", "--replicas", "1", "--instances", "2"
    )
    assert summary["exit_code"] == 0, summary["stdout"]
    cells = summary["cells"]
    assert [(c["workers"], c["replicas"], c["pgbouncer_instances"]) for c in cells] == [
        (2, 1, 2),
        (1, 1, 2),
    ]
    # Transaction pooling: never more server connections than clients using them.
    assert cells[1]["pgbouncer_servers"] <= cells[1]["measured_clients"], cells[1]
    for cell in cells:
        assert cell["measured_clients"] == cell["predicted_clients"] == cell["workers"] * 4
        split = parse_counts(cell["clients_by_instance"])
        assert set(split) <= {"pgbouncer-1", "pgbouncer-2"}
        assert sum(split.values()) == cell["measured_clients"], cell["clients_by_instance"]
        # Each instance serves at most its own small pool (6), whatever the clients.
        assert all(n <= 6 for n in parse_counts(cell["servers_by_instance"]).values())
        assert cell["pgbouncer_servers"] <= 2 * 6
        assert cell["as_predicted"], cell["verdict"]
        assert cell["requests"] > 0
        assert 0 <= cell["background_cores"] <= (os.cpu_count() or 1)
        # One mean per worker of the one replica.
        assert cell["in_flight_by_worker"].count(",") == cell["workers"] - 1, cell
        # The reads' Server-Timing parts and Locust's latency, each p50 <= p99.
        parts = parse_parts(cell["read_server_timing"])
        assert set(parts) == {"queue", "db", "app", "locust"}, cell["read_server_timing"]
        assert all(p50 <= p99 for p50, p99 in parts.values()), parts
        # What the rig cost per request: Locust far more than haproxy, both some.
        assert 0 < cell["haproxy_ms_per_request"] < cell["locust_ms_per_request"] < 5, cell
    for name in ("report.md", "cells.csv", "client_connections.png", "server_connections.png"):
        assert (out / name).exists(), name
    assert "2 of 2 cells as predicted" in (out / "report.md").read_text()
    assert "Other load:" in (out / "report.md").read_text()


def test_direct_cell_over_budget_fails_as_predicted(scratch: Path) -> None:
    """3 replicas x 1 worker x 4 = 12 connections straight to a PostgreSQL with 6 to spare.

    One replica (4) fits, so each starts; together they overflow under load.
    """
    out = scratch / "sweep-direct"
    summary = sweep(
        out,
        "--modes",
        "direct",
        "--workers",
        "1",
        "--replicas",
        "3",
        "--direct-max-connections",
        "12",
    )
    (cell,) = summary["cells"]
    assert not cell["budget_fits"]
    assert cell["connection_errors"] > 0, "PostgreSQL must refuse the overflow"
    assert cell["measured_clients"] < cell["predicted_clients"]
    assert cell["as_predicted"], cell["verdict"]
