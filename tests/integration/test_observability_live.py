"""The live proof: the whole stack under load, scraped by Prometheus, and every panel
query of every dashboard answered with data. Also: per-worker pool series, summed."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.stack import Stack
from loadtests.common.prom import Scrape
from tests.support.dashboards import DASHBOARDS, panels
from tests.support.stack import Databases, StartService, metric_samples, running_stack

pytestmark = pytest.mark.slow  # a whole stack under load, and gunicorn

RATE_INTERVAL = "1m"  # what $__rate_interval becomes (Grafana: max(4 x scrape, ...))


@pytest.fixture(scope="module")
def live_stack(scratch: Path) -> Iterator[Stack]:
    # Two PgBouncers, so that every per-instance panel is proved with more than one.
    with running_stack(
        scratch / "live-stack",
        {"WORKERS": "2", "POOL_MIN": "1", "POOL_MAX": "3"},
        most_replicas=2,
        most_pgbouncers=2,
        replicas=2,
        pgbouncer_instances=2,
        seed_items=100,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def under_load(live_stack: Stack) -> Iterator[None]:
    """Reads, writes, 404s and 422s through the load balancer until the module ends."""
    stop = threading.Event()
    url = live_stack.haproxy().url

    def drive() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                i += 1
                http.get(f"/items/{i % 100 + 1}")
                http.post("/visits", json={"item_id": i % 100 + 1})
                if i % 10 == 0:
                    http.get("/items/999999")
                    http.get("/items?limit=0")

    threads = [threading.Thread(target=drive) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    url = f"{stack.prometheus().url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = httpx.get(url, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.fixture(scope="module")
def scraped(live_stack: Stack, under_load: None) -> Stack:
    """Wait until Prometheus has seen traffic from every replica and both exporters."""

    def ready() -> bool:
        return (
            len(query(live_stack, "rate(pgscale_http_requests_total[1m]) > 0")) > 0
            and len(query(live_stack, "count by (replica) (pgscale_pool_max_connections)")) == 2
            and len(query(live_stack, "pgbouncer_up == 1")) == 2
            # rate() needs two scrapes of the exporter, which may start after the replicas
            and len(query(live_stack, "rate(pgbouncer_stats_transactions_total[1m])")) > 0
            and len(query(live_stack, "pg_up == 1")) == 1
            and len(query(live_stack, "pgbouncer:cpu_cores:rate1m")) == 2
            and len(query(live_stack, "pgscale:pool_max_connections:sum")) == 1
        )

    assert procs.wait_until(ready, 60, interval=1), "Prometheus never saw the stack under load"
    return live_stack


def test_every_target_is_up(scraped: Stack) -> None:
    targets = httpx.get(f"{scraped.prometheus().url}/api/v1/targets", timeout=10).json()
    active = targets["data"]["activeTargets"]
    jobs = {"api", "pgbouncer", "postgres", "process", "prometheus"}
    assert {t["labels"]["job"] for t in active} == jobs
    assert len(active) == 6  # two replicas, one target each for the others
    assert all(t["health"] == "up" for t in active), [
        (t["scrapeUrl"], t["lastError"]) for t in active
    ]


def test_every_rule_loads_and_evaluates(scraped: Stack) -> None:
    rules = httpx.get(f"{scraped.prometheus().url}/api/v1/rules", timeout=10).json()
    groups = rules["data"]["groups"]
    assert groups
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def substitute(expr: str) -> str:
    """What Grafana sends with every variable at "All"."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


PANEL_QUERIES = [
    pytest.param(target["expr"], id=f"{path.stem}: {panel['title']} [{target['refId']}]")
    for path in DASHBOARDS
    for panel in panels(json.loads(path.read_text()))
    for target in panel["targets"]
]


@pytest.mark.parametrize("expr", PANEL_QUERIES)
def test_every_panel_query_returns_data(scraped: Stack, expr: str) -> None:
    assert query(scraped, substitute(expr)), f"no data for {substitute(expr)}"


def test_every_template_variable_has_values(scraped: Stack) -> None:
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            metric, label = re.fullmatch(
                r"label_values\((\w+), (\w+)\)", variable["query"]["query"]
            ).groups()  # type: ignore[union-attr]
            url = f"{scraped.prometheus().url}/api/v1/label/{label}/values"
            values = httpx.get(url, params={"match[]": metric}, timeout=10).json()["data"]
            assert values, (path.name, variable["name"])


def test_replica_metrics_show_each_worker_moving_with_load(scraped: Stack) -> None:
    replica = scraped.replica(1)
    scrape = Scrape.get(replica.metrics_url)
    assert len(scrape.by_pid("pgscale_pool_connections_in_use")) == 2

    def some_in_use() -> bool:
        return Scrape.get(replica.metrics_url).total("pgscale_pool_connections_in_use") > 0

    # The gauge is a snapshot a second, and a connection is checked out for a fraction
    # of each request (less still when requests share a statement): look until one is.
    assert procs.wait_until(some_in_use, 15, interval=0.25), (
        "under load some connections must be in use"
    )
    max_total = scrape.total("pgscale_pool_max_connections")
    assert max_total == 2 * 3  # W x POOL_MAX


def test_two_workers_pool_gauges_are_visible_and_sum(
    start_service: StartService, databases: Databases
) -> None:
    replica = start_service(workers=2, pool_min=3, pool_max=5, replica_name="metrics-test")

    def settled() -> bool:
        sizes = metric_samples(replica.metrics_url, "pgscale_pool_connections")
        return len(sizes) == 2 and sum(sizes.values()) == 6

    assert procs.wait_until(settled, 10), metric_samples(
        replica.metrics_url, "pgscale_pool_connections"
    )
    # What the workers report equals what PgBouncer sees from this replica.
    clients = [
        c
        for c in databases.bouncer.admin("SHOW CLIENTS")
        if c["application_name"].startswith("metrics-test-")
    ]
    assert len(clients) == 6
    pids_from_bouncer = {c["application_name"].rsplit("-", 1)[1] for c in clients}
    assert set(metric_samples(replica.metrics_url, "pgscale_pool_max_connections")) == (
        pids_from_bouncer
    )
    assert sum(metric_samples(replica.metrics_url, "pgscale_pool_max_connections").values()) == 10

    # A killed worker is replaced, and its series disappear.
    victim = sorted(pids_from_bouncer)[0]
    os.kill(int(victim), signal.SIGKILL)

    def replaced() -> bool:
        pids = set(metric_samples(replica.metrics_url, "pgscale_pool_max_connections"))
        return len(pids) == 2 and victim not in pids

    assert procs.wait_until(replaced, 20)
    assert httpx.get(f"{replica.url}/items/1").status_code == 200


def test_the_budget_rules_predict_the_running_shape(scraped: Stack) -> None:
    """2 replicas x 2 workers x POOL_MAX 3 over two PgBouncers: 12 predicted, 6 each,
    and the clients the PgBouncers count within the drift alert's bound."""

    def value(expr: str) -> float | None:
        found = query(scraped, expr)
        return float(found[0]["value"][1]) if found else None

    assert procs.wait_until(
        lambda: value("pgscale:budget_client_connections_peak:sum") == 12, 30
    ), value("pgscale:budget_client_connections_peak:sum")
    assert value("pgscale:budget_client_connections_peak:per_pgbouncer") == 6
    assert value("pgscale:budget_client_connections_rest:sum") == 4  # POOL_MIN 1
    ratios = query(scraped, "pgbouncer:client_connections_over_budget:ratio")
    assert len(ratios) == 2  # one per PgBouncer
    counted = value("sum(pgbouncer:client_connections:sum)")
    assert counted is not None
    assert 4 <= counted <= 1.2 * 12


def test_where_the_time_goes_adds_up(scraped: Stack) -> None:
    """Per route, queue + db stays within the whole request time, and reads hold a
    connection for some of it."""
    by_route = "sum by (route, method) (rate(pgscale_http_request_{}_seconds_{}[1m]))"
    parts = {
        part: {
            (s["metric"]["route"], s["metric"]["method"]): float(s["value"][1])
            for s in query(scraped, by_route.format(part, "sum"))
        }
        for part in ("queue", "db", "duration")
    }
    read = ("/items/{item_id}", "GET")
    assert parts["db"][read] > 0
    for key, whole in parts["duration"].items():
        assert parts["queue"][key] + parts["db"][key] <= whole * 1.001, key
