"""The connection budget: its arithmetic on both sides, direct mode, the guard and the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from infra.localstack.config import REPO
from service.budget import (
    AppShape,
    BouncerLimits,
    BudgetExceeded,
    PostgresLimits,
    Topology,
    check,
    deployment_topology,
    guard,
    max_safe_replicas,
)


def topology(
    replicas: int = 2,
    workers: int = 2,
    pool_min: int = 2,
    pool_max: int = 4,
    *,
    direct: bool = False,
    max_connections: int = 100,
    superuser_reserved: int = 3,
    other_clients: int = 3,
    **bouncer: float,
) -> Topology:
    limits = {
        "max_client_conn": 1000,
        "default_pool_size": 20,
        "reserve_pool_size": 5,
        "max_db_connections": 30,
        **bouncer,
    }
    return Topology(
        app=AppShape(replicas, workers, pool_min, pool_max),
        postgres=PostgresLimits(max_connections, superuser_reserved, other_clients),
        bouncer=None if direct else BouncerLimits(**limits),  # type: ignore[arg-type]
    )


def test_the_local_stack_defaults_fit_with_their_numbers() -> None:
    budget = check(topology())
    assert budget.ok
    assert budget.problems == ()
    assert budget.mode == "pgbouncer"
    assert budget.clients_at_rest == 2 * 2 * 2
    assert budget.clients_at_peak == 2 * 2 * 4
    assert budget.client_capacity == 1000
    assert budget.client_usable == 1000 - 3  # the exporter, an admin, the sampler
    assert budget.client_headroom == 997 - 16
    assert budget.busiest_instance_clients == 16 + 3
    assert budget.server_at_peak == 25  # default 20 + reserve 5, under max_db_connections 30
    assert budget.server_available == 100 - 3 - 3
    assert budget.server_headroom == 94 - 25
    assert budget.max_safe_replicas == 997 // 8


def test_deployment_topology_reads_the_settings_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SHAPE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert deployment_topology() == topology()
    assert deployment_topology(direct=True) == topology(direct=True)


def test_max_db_connections_caps_the_server_side_per_instance() -> None:
    capped = check(topology(default_pool_size=40, reserve_pool_size=10, max_db_connections=30))
    assert capped.server_at_peak == 30
    uncapped = check(topology(default_pool_size=40, reserve_pool_size=10, max_db_connections=0))
    assert uncapped.server_at_peak == 50
    pools = check(topology(pools=3, max_db_connections=0))
    assert pools.server_at_peak == 3 * 25


def test_server_connections_stay_flat_while_replicas_multiply() -> None:
    peaks = {check(topology(replicas=r)).server_at_peak for r in (1, 10, 100)}
    assert peaks == {25}


def test_clients_past_max_client_conn_fail_naming_the_numbers() -> None:
    budget = check(topology(replicas=200))
    assert not budget.ok
    assert budget.client_headroom == 997 - 1600
    assert budget.max_safe_replicas == 124
    (problem,) = budget.problems
    assert problem.startswith("PgBouncer clients: 200 replicas x 2 workers x POOL_MAX 4 = 1600")
    assert "997" in problem
    assert "max_client_conn 1000" in problem
    assert check(topology(replicas=124)).ok
    assert not check(topology(replicas=125)).ok


def test_extra_clients_count_against_max_client_conn() -> None:
    assert check(topology(replicas=1, max_client_conn=11, extra_clients=3)).ok
    assert not check(topology(replicas=1, max_client_conn=10, extra_clients=3)).ok
    assert check(topology(replicas=1, max_client_conn=3, extra_clients=3)).client_usable == 0


def test_several_instances_keep_headroom_for_uneven_balancing() -> None:
    budget = check(topology(max_client_conn=100, instances=2, extra_clients=0, skew=0.1))
    # The busiest of 2 instances gets 1.1 x C / 2, so C may reach 2 x 100 / 1.1 = 181.
    assert budget.client_capacity == 200
    assert budget.client_usable == 181
    assert budget.busiest_instance_clients == 9  # ceil(16 / 2 x 1.1)
    fits = check(topology(replicas=22, max_client_conn=100, instances=2, extra_clients=0))
    assert fits.clients_at_peak == 176
    assert fits.ok
    assert not check(topology(replicas=23, max_client_conn=100, instances=2, extra_clients=0)).ok
    assert fits.max_safe_replicas == 22
    # One instance takes every connection: no allowance for balancing.
    assert check(topology(max_client_conn=100, extra_clients=0, skew=0.1)).client_usable == 100


def test_pgbouncer_that_can_outgrow_postgres_fails_whatever_the_replicas() -> None:
    budget = check(topology(replicas=1, instances=4, max_connections=100))
    assert budget.server_at_peak == 100
    assert budget.server_headroom == 94 - 100
    assert budget.max_safe_replicas == 0
    (problem,) = budget.problems
    assert problem.startswith("PostgreSQL: PgBouncer may open 100 server connections")
    assert "max_connections 100 - superuser_reserved_connections 3 - 3 other clients" in problem


def test_both_sides_can_fail_at_once() -> None:
    budget = check(topology(replicas=300, instances=1, max_connections=20))
    assert [p.split(":")[0] for p in budget.problems] == ["PgBouncer clients", "PostgreSQL"]


def test_direct_mode_lands_every_pool_connection_on_postgres() -> None:
    budget = check(topology(replicas=6, direct=True))
    assert budget.mode == "direct"
    assert budget.client_capacity is None
    assert budget.client_usable is None
    assert budget.client_headroom is None
    assert budget.server_at_peak == budget.clients_at_peak == 48
    assert budget.server_headroom == 94 - 48
    assert budget.max_safe_replicas == 94 // 8
    assert budget.ok
    too_many = check(topology(replicas=12, direct=True))
    (problem,) = too_many.problems
    assert "direct, no PgBouncer" in problem
    assert "96" in problem
    assert "too many clients" in problem


def test_the_same_shape_fits_through_pgbouncer_but_not_direct() -> None:
    shape = topology(replicas=20)
    assert check(shape).ok
    assert not check(shape.direct()).ok
    assert max_safe_replicas(shape) > max_safe_replicas(shape.direct())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AppShape(1, 1, 5, 4), "POOL_MIN (5) must not exceed POOL_MAX (4)"),
        (lambda: AppShape(1, 0, 1, 4), "workers must be 1 or more (got 0)"),
        (lambda: BouncerLimits(0, 20, 5), "max_client_conn must be 1 or more (got 0)"),
        (lambda: BouncerLimits(10, 20, 5, skew=1.0), "skew must be at least 0 and below 1"),
        (lambda: PostgresLimits(10, 10), "must be below max_connections (10)"),
    ],
)
def test_impossible_inputs_are_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()  # type: ignore[operator]


def test_guard_refuses_a_replica_that_cannot_fit_alone() -> None:
    with pytest.raises(BudgetExceeded, match="1 replica x 8 workers x POOL_MAX 16 = 128"):
        guard(topology(replicas=1, workers=8, pool_max=16, direct=True))
    with pytest.raises(BudgetExceeded, match="PgBouncer may open 100 server connections"):
        guard(topology(instances=4))


def test_guard_warns_when_the_declared_replicas_overflow(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.budget"):
        budget = guard(topology(replicas=20, direct=True))
    assert not budget.ok
    (record,) = caplog.records
    assert "160 connections at peak" in record.getMessage()
    assert "at most 11 replicas" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.budget"):
        assert guard(topology()).ok
    assert caplog.records == []


# ---- the command line ------------------------------------------------------------------

# Settings the CLI would otherwise pick up from the caller's environment.
SHAPE_VARIABLES = {"REPLICAS", "WORKERS", "POOL_MIN", "POOL_MAX"} | {
    name for name in os.environ if name.startswith(("PGBOUNCER_", "POSTGRES_"))
}


def budget_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SHAPE_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "service.budget", *args],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_a_table_and_exits_0_when_the_budget_holds() -> None:
    result = budget_cli()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "through PgBouncer: 2 replicas x 2 workers x pool 2..4" in out
    assert "verdict: ok" in out
    lines = [line.strip() for line in out.splitlines()]
    for label, value in [("at rest", "8"), ("at peak", "16"), ("usable by the app", "997")]:
        assert any(line.startswith(label) and value in line.split() for line in lines), out
    assert any(line.startswith("largest safe replicas") and "124" in line for line in lines)


def test_cli_json_has_every_number_and_exits_1_when_the_budget_fails() -> None:
    result = budget_cli("--json", "--replicas", "130")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["mode"] == "pgbouncer"
    assert data["clients_at_peak"] == 130 * 8
    assert data["client_usable"] == 997
    assert data["max_safe_replicas"] == 124
    assert data["topology"]["bouncer"]["max_db_connections"] == 30
    assert data["problems"][0].startswith("PgBouncer clients: 130 replicas")


def test_cli_direct_mode_and_every_flag() -> None:
    result = budget_cli(
        "--json",
        "--direct",
        "--replicas=3",
        "--workers=4",
        "--pool-min=1",
        "--pool-max=5",
        "--max-connections=50",
        "--superuser-reserved=2",
        "--other-clients=1",
    )
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["mode"] == "direct"
    assert data["topology"]["bouncer"] is None
    assert (data["clients_at_rest"], data["server_at_peak"], data["server_available"]) == (
        12,
        60,
        47,
    )
    flags = [
        "--max-client-conn=500",
        "--default-pool-size=10",
        "--reserve-pool-size=2",
        "--max-db-connections=0",
        "--pgbouncer-instances=2",
        "--pools=2",
        "--pgbouncer-extra-clients=1",
        "--skew=0.25",
    ]
    data = json.loads(budget_cli("--json", *flags).stdout)
    assert data["topology"]["bouncer"] == {
        "max_client_conn": 500,
        "default_pool_size": 10,
        "reserve_pool_size": 2,
        "max_db_connections": 0,
        "instances": 2,
        "pools": 2,
        "extra_clients": 1,
        "skew": 0.25,
    }
    assert data["server_at_peak"] == 2 * 2 * 12
    assert data["client_usable"] == 998 * 4 // 5


def test_cli_defaults_follow_the_environment_like_make_up() -> None:
    data = json.loads(budget_cli("--json", REPLICAS="5", POOL_MAX="6").stdout)
    assert data["topology"]["app"] == {"replicas": 5, "workers": 2, "pool_min": 2, "pool_max": 6}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--pool-min", "9"], {}, "POOL_MIN (9) must not exceed POOL_MAX (4)"),
        (["--replicas", "two"], {}, "invalid int value: 'two'"),
        (["--skew", "-0.1"], {}, "skew must be at least 0"),
        ([], {"POOL_MAX": "many"}, "invalid settings in the environment"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = budget_cli(*args, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_cli_follows_via_pgbouncer_false_and_can_be_told_otherwise() -> None:
    """VIA_PGBOUNCER=false (as `make up` and the sweep's direct contrast set it) makes the
    CLI check direct mode; --no-direct checks the PgBouncer side anyway."""
    direct = budget_cli("--json", VIA_PGBOUNCER="false")
    assert direct.returncode in (0, 1), direct.stderr
    assert json.loads(direct.stdout)["mode"] == "direct"
    through = budget_cli("--json", "--no-direct", VIA_PGBOUNCER="false")
    assert json.loads(through.stdout)["mode"] == "pgbouncer"
