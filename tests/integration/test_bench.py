"""The benchmark runs end to end (one short round) and its report holds together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.localstack.config import REPO
from loadtests.bench.plan import (
    DATABASE_RUNS,
    PAIRS,
    PLAN,
    REPLICA_SETTINGS,
    Config,
    Endpoint,
    Pair,
    RunKey,
)
from loadtests.bench.report import latency_floor
from loadtests.bench.results import Result, paired_ratios
from loadtests.bench.scripts import SCRIPTS
from service.calibration import load as load_calibration


def run(key: RunKey, round_: int, rps: float) -> Result:
    return Result(key, rps, 1.0, 2.0, 0, 0, round=round_, cpu_ms={"workers": 1.0})


def test_ratios_are_taken_within_each_round_then_the_median() -> None:
    item = RunKey(Config.POOLED, Endpoint.GET_ITEM)
    ceiling = RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ)
    # The machine slows down in round 2: both runs of that round do.
    raw = {
        item: [run(item, 1, 300), run(item, 2, 100), run(item, 3, 330)],
        ceiling: [run(ceiling, 1, 1000), run(ceiling, 2, 350), run(ceiling, 3, 1000)],
    }
    ratios = paired_ratios(raw)
    assert ratios[Pair.ITEM_VS_FRAMEWORK] == pytest.approx(0.3)
    assert Pair.VISIT_VS_ITEM not in ratios  # no POST runs: no ratio


def test_latency_floor_is_littles_law_on_the_cpu_per_request() -> None:
    floor = latency_floor(
        64,
        Result(
            RunKey(Config.POOLED, Endpoint.GET_ITEM),
            1000.0,
            1,
            2,
            0,
            0,
            cpu_ms={"a": 1.5, "b": 0.5},
        ),
        Result(RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ), 5000.0, 1, 2, 0, 0, cpu_ms={"a": 0.25}),
        Result(
            RunKey(Config.DRIVER, Endpoint.PSYCOPG_SELECT), 4000.0, 1, 2, 0, 0, cpu_ms={"a": 0.25}
        ),
    )
    cores = floor["cores"]
    assert floor["cpu_ms_per_request"] == 2.0
    assert floor["max_rps"] == round(1000 * cores / 2.0)
    assert floor["mean_latency_floor_ms"] == round(64 * 2.0 / cores, 1)
    assert floor["measured_mean_latency_ms"] == 64.0
    assert floor["bare_cpu_ms_per_request"] == 0.5
    assert floor["bare_mean_latency_floor_ms"] == round(64 * 0.5 / cores, 1)
    # The framework ceiling: 5000 req/s at 64 connections is a 12.8 ms mean; p99 2 ms.
    assert floor["framework_p99_over_mean"] == round(2.0 / 12.8, 2)
    assert floor["bare_p99_estimate_ms"] == round(2.0 / 12.8 * 64 * 0.5 / cores, 1)


def test_every_pair_a_target_compares_is_in_the_plan() -> None:
    planned = {*PLAN, *DATABASE_RUNS}
    assert set(PAIRS) == set(Pair)
    for top, bottom in PAIRS.values():
        assert top in planned
        assert bottom in planned


def test_every_planned_run_has_a_replica_and_a_script() -> None:
    for key in PLAN:
        assert key.config.replica in REPLICA_SETTINGS, key
        assert key.endpoint in SCRIPTS, key
        assert key.connections is None, key  # --also-connections adds those
    # The framework ceiling is /healthz on the pooled replica, under its own label.
    assert Config.FRAMEWORK.replica is Config.POOLED
    assert (
        RunKey(Config.POOLED, Endpoint.GET_ITEM, 4).label == "pooled (as deployed), 4 connections"
    )


@pytest.mark.slow
def test_one_short_round_end_to_end(tmp_path: Path) -> None:
    subprocess.run(
        [
            *(sys.executable, "-m", "loadtests.bench", "--rounds", "1", "--duration", "2"),
            *("--connections", "16", "--also-connections", "4", "--out", str(tmp_path)),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["endpoint"], r["config"]): r for r in report["results"]}
    # Every planned run, one at 4 connections, the pgbench runs, the driver ceiling.
    assert len(rows) == len(PLAN) + 1 + len(DATABASE_RUNS)
    for key in DATABASE_RUNS:
        assert (key.endpoint.value, key.label) in rows, key
    assert ("GET /items/{id}", "pooled (as deployed), 4 connections") in rows
    for row in rows.values():
        assert row["rps"] > 0
        assert row["non2xx"] == 0, row
        assert row["socket_errors"] == 0, row
    pooled = rows[("GET /items/{id}", "pooled (as deployed)")]
    assert pooled["cpu_ms_per_request"]["workers"] > 0
    assert pooled["cpu_ms_per_request"]["postgres"] > 0
    assert pooled["cpu_ms_per_request"]["pgbouncer"] > 0
    direct = rows[("GET /items/{id}", "direct to PostgreSQL")]
    assert direct["cpu_ms_per_request"]["pgbouncer"] < pooled["cpu_ms_per_request"]["pgbouncer"]
    assert set(report["paired_ratios"]) == {pair.value for pair in PAIRS}
    driver = rows[("psycopg SELECT by id", "driver ceiling")]
    assert driver["cpu_ms_per_request"]["load generator"] > 0  # psycopg's own CPU
    floor = report["latency_floor"]
    assert floor["bare_cpu_ms_per_request"] > 0
    # Requests per statement, from each replica's own metrics: coalescing off means one
    # statement per request; metrics off means nothing to read; never-coalesced is blank.
    single = rows[("GET /items/{id}", "pooled, coalescing off")]
    assert single["requests_per_statement"] == 1.0
    assert pooled["requests_per_statement"] >= 1.0
    assert floor["requests_per_statement"] == pooled["requests_per_statement"]
    assert rows[("GET /items/{id}", "pooled, metrics off")]["requests_per_statement"] is None
    assert rows[("GET /healthz", "framework ceiling")]["requests_per_statement"] is None
    assert {t["target"] for t in report["targets"]} >= {
        "GET /items/{id} vs naive",
        "GET /items/{id} p99 ms",
        "start to ready s",
    }
    # Two PgBouncers: both runs measured, PgBouncer's CPU per statement seen in each.
    two = rows[("GET /items/{id}", "coalescing off, 2 PgBouncers")]
    assert two["cpu_ms_per_request"]["pgbouncer"] > 0
    assert two["requests_per_statement"] == 1.0
    scaling = report["pgbouncer_instances"]
    for name in ("get_item", "pgbench_select"):
        assert scaling[name]["ratio_two_vs_one"] > 0
        assert scaling[name]["pgbouncer_cpu_ms_per_statement"] > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert "What a second PgBouncer buys" in markdown
    # The calibration the capacity planner reads, derived from this run.
    calibration = load_calibration(tmp_path / "calibration.json")
    for process in ("worker", "pgbouncer", "postgres"):
        for kind in ("read", "write", "list"):
            assert calibration.cost(process, kind).at(1) > 0, (process, kind)
    assert calibration.requests_per_statement.keys() == {4, 16}
    assert calibration.per_worker_rps["read"] > 0
    assert "CPU per request" in markdown
    assert "Latency arithmetic" in markdown
