"""Prometheus config, rules and alert tests, dashboards, and the metrics documentation.

The live proof (every panel query returns data) is in test_observability_live.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from infra.localstack.config import REPO
from service import metrics
from tests.support.dashboards import DASHBOARDS, panels

INFRA = REPO / "infra"
DOCS = REPO / "docs"
RULE_FILES = sorted((INFRA / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((INFRA / "prometheus" / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(INFRA / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_alert_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def alerts() -> list[str]:
    names = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [rule["alert"] for rule in group["rules"] if "alert" in rule]
    return names


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    tests = [t for path in RULE_TESTS for t in yaml.safe_load(path.read_text())["tests"]]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    names = set(alerts())
    assert len(names) >= 10
    assert names - firing == set(), "alerts never seen firing"
    assert names - silent == set(), "alerts never seen silent"


def test_required_alerts_exist() -> None:
    names = set(alerts())
    for required in (
        "PgscalePoolSaturated",
        "PgscalePoolWaiters",
        "PgscalePoolAcquireFailures",
        "PgBouncerClientsWaiting",
        "PgBouncerMaxWaitHigh",
        "PostgresConnectionsNearMax",
        "PgscaleHigh5xxRatio",
        "PgscaleHighLatencyP99",
    ):
        assert required in names


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("pgscale-")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "replica"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


def test_dashboard_provisioning_points_at_the_dashboards() -> None:
    provider = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "dashboards" / "pgscale.yml").read_text()
    )
    assert provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["type"] == "prometheus"


def defined_metrics() -> dict[str, str]:
    """Exported name -> type, for every metric service/metrics.py defines."""
    names = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffix = "_total" if family.type == "counter" else ""
            names[family.name + suffix] = family.type
    return names


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    documented = dict(
        re.findall(r"^\| `(pgscale_\w+)` \| (\w+) \|", (DOCS / "metrics.md").read_text(), re.M)
    )
    assert documented == defined_metrics()
