"""The capacity planner: shapes that hold the budget, each number with its rule."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from infra.localstack.config import REPO
from service.calibration import load
from service.planner import NoShape, Target, plan, render

CALIBRATION = load()


def planner_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.budget", "plan", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_plan_holds_the_budget_at_both_rollout_extremes() -> None:
    p = plan(Target(rps=20_000), CALIBRATION)
    s = p.shape
    assert p.serving.ok
    assert p.rollout.ok
    # One PgBouncer out: every client on the rest. One draining: all their servers.
    assert p.serving.topology.bouncer is not None
    assert p.serving.topology.bouncer.instances == s.instances - 1
    assert p.rollout.server_at_peak == (s.instances + 1) * s.max_db_connections
    assert p.serving.clients_at_peak == (s.replicas + 1) * s.workers * s.pool_max
    assert s.hpa_min == 2
    assert s.hpa_min <= s.replicas


def test_each_number_names_its_rule() -> None:
    p = plan(Target(rps=20_000, postgres_cores=8), CALIBRATION)
    rules = {d.name: d for d in p.decisions}
    assert "PostgreSQL wiki: (8 cores x 2) + 1 effective_spindles" in (
        rules["active server connections"].rule
    )
    assert rules["POOL_MAX"].rule.startswith("Little:")
    assert rules["POOL_MAX"].value == p.shape.pool_max
    for name in ("replicas (HPA maxReplicas)", "PgBouncer instances", "max_client_conn"):
        assert rules[name].rule


def test_pools_follow_littles_law() -> None:
    t = Target(rps=20_000)
    p = plan(t, CALIBRATION)
    worker_rps = 1000 / CALIBRATION.mix("worker", t.write_ratio)
    hold = (
        CALIBRATION.mix("pgbouncer", t.write_ratio)
        + CALIBRATION.mix("postgres", t.write_ratio)
        + 2 * t.rtt_ms
    )
    assert p.shape.pool_max == math.ceil(worker_rps * hold / 1000) + 1


def test_server_connections_grow_far_slower_than_client_connections() -> None:
    small = plan(Target(rps=5_000, postgres_cores=16), CALIBRATION)
    large = plan(Target(rps=50_000, postgres_cores=16), CALIBRATION)
    assert large.shape.replicas > small.shape.replicas
    assert large.shape.instances > small.shape.instances
    # At 5000/s the wiki's (2 x 16) + 1 = 33 active connections set the server pools...
    small_servers = small.shape.instances * small.shape.default_pool_size
    assert small_servers - small.shape.instances < 33 <= small_servers
    # ...at 50000/s Little's law does, and they grow by far less than the clients.
    clients = large.serving.clients_at_peak / small.serving.clients_at_peak
    servers = large.shape.instances * large.shape.default_pool_size / small_servers
    assert clients > 4
    assert servers < clients / 2


def test_a_target_past_one_postgresql_has_no_shape() -> None:
    with pytest.raises(NoShape, match=r"PostgreSQL needs .* cores"):
        plan(Target(rps=2_000_000, postgres_cores=8), CALIBRATION)


def test_a_fixed_max_connections_too_small_has_no_shape() -> None:
    with pytest.raises(NoShape, match="max_connections 20 is below"):
        plan(Target(rps=20_000, max_connections=20), CALIBRATION)


def test_too_few_fixed_replicas_have_no_shape() -> None:
    with pytest.raises(NoShape, match="at least"):
        plan(Target(rps=100_000, replicas=2, postgres_cores=32), CALIBRATION)


def test_a_p99_below_one_request_has_no_shape() -> None:
    with pytest.raises(NoShape, match="below what one request costs"):
        plan(Target(rps=1000, p99_ms=1), CALIBRATION)


def test_cli_prints_the_shape_rules_and_bottleneck() -> None:
    result = planner_cli("--target-rps", "20000")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("shape:", "rules:", "bottleneck:", "HPA minReplicas..maxReplicas", "verdict: ok"):
        assert text in out


def test_cli_json_and_exit_1_with_the_reason() -> None:
    ok = planner_cli("--target-rps", "20000", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["fits"] is True
    assert data["shape"]["instances"] >= 2
    assert data["budget_rollout"]["ok"] is True
    refused = planner_cli("--target-rps", "2000000", "--json")
    assert refused.returncode == 1
    assert "PostgreSQL needs" in json.loads(refused.stdout)["reason"]
    text = planner_cli("--target-rps", "2000000")
    assert text.returncode == 1
    assert text.stdout.startswith("no shape fits: PostgreSQL needs")


def test_cli_bad_input_exits_2() -> None:
    result = planner_cli("--target-rps", "-5")
    assert result.returncode == 2
    assert "--target-rps must be above 0" in result.stderr


def test_readme_shows_what_the_planner_prints_for_the_prod_target() -> None:
    """README.md's "Sizing a fleet" output is the planner's own, for k8s prod's target."""
    target = Target(rps=20_000, write_ratio=0.1, p99_ms=50, postgres_cores=8, max_connections=200)
    printed = render(plan(target, CALIBRATION))
    shown = printed[: printed.index("\n-- budget")]
    assert shown in (REPO / "README.md").read_text()
