"""The whole compose topology in containers under Podman, tested end to end.

One project (its own name, ports on 127.0.0.1 chosen at run time) is brought up stage
by stage (infra/docker/podman.py: podman-compose ignores the health gates here), then
scaled to three replicas; the checks run against those containers, and everything the
project made is removed at the end, pass or fail. Grafana is left out: it has no
Debian package to stand in for its image.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from infra.docker import compose
from infra.docker.podman import Compose
from infra.localstack import procs
from infra.localstack.certs import TlsFiles
from loadtests.common.poll import Poll
from service.budget import check, environment_topology
from tests.faults.ledger import Ledger, audit
from tests.faults.load import Load, Recorder

pytestmark = pytest.mark.slow

WORKERS = 2
POOL_MAX = 4
REPLICAS = 3
SEED_ITEMS = 200
# Items only the fault's writes touch, so the audit counts their visits alone.
WRITE_ITEMS = list(range(181, 201))


@dataclass
class Stack:
    compose: Compose
    env: dict[str, str]
    lb: str
    prometheus: str

    def ip(self, service: str, index: int = 1) -> str:
        """The container's address on the project's network (reachable from the host)."""
        nets = inspect(self.compose.container(service, index))["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def postgres(self, user: str, password: str, dbname: str) -> str:
        """Over TLS, the chain verified against the project's CA (verify-ca: the host
        dials an address the certificate does not name); the application role also with
        PgBouncer's client pair, the only way pg_hba.conf lets that role in."""
        tls = TlsFiles(self.tls_dir()).libpq(client_cert=user == "app")
        params = " ".join(f"{k}={v}" for k, v in {**tls, "sslmode": "verify-ca"}.items())
        return (
            f"host={self.ip('postgres')} port=5432 dbname={dbname} user={user}"
            f" password={password} {params}"
        )

    def tls_dir(self) -> Path:
        """The certs service's volume, seen from the host."""
        volume = f"{self.compose.project}_tls"
        out = subprocess.run(
            ["podman", "volume", "inspect", volume], capture_output=True, text=True, check=True
        ).stdout
        return Path(json.loads(out)[0]["Mountpoint"])

    def bouncer_admin(self, command: str) -> list[dict[str, Any]]:
        """One command on PgBouncer's console, as the stats user the exporter uses."""
        conninfo = (
            f"host={self.ip('pgbouncer')} port=6432 dbname=pgbouncer user=pgbouncer_stats "
            f"password={self.env['PGBOUNCER_STATS_PASSWORD']}"
        )
        with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
            cur = conn.execute(command)
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def inspect(container: str) -> dict[str, Any]:
    out = subprocess.run(
        ["podman", "inspect", container], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out)[0])


def secret() -> str:
    return secrets.token_urlsafe(18)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    port = procs.free_port_block(2)
    env = {
        "PUBLISH_ADDRESS": "127.0.0.1",
        "LB_PORT": str(port),
        "PROMETHEUS_PORT": str(port + 1),
        "API_REPLICAS": "2",
        "WORKERS": str(WORKERS),
        # Pools open all their connections at start, so SHOW CLIENTS has a fixed count.
        "POOL_MIN": str(POOL_MAX),
        "POOL_MAX": str(POOL_MAX),
        "SEED_ITEMS": str(SEED_ITEMS),
        # A PgBouncer pool well below the clients, so the multiplexing shows.
        "PGBOUNCER_DEFAULT_POOL_SIZE": "4",
        "PGBOUNCER_RESERVE_POOL_SIZE": "1",
        "PGBOUNCER_MAX_DB_CONNECTIONS": "5",
        **{
            name: secret()
            for name in (
                "POSTGRES_PASSWORD",
                "APP_PASSWORD",
                "EXPORTER_PASSWORD",
                "PGBOUNCER_ADMIN_PASSWORD",
                "PGBOUNCER_STATS_PASSWORD",
                "GRAFANA_ADMIN_PASSWORD",
            )
        },
    }
    compose = Compose(f"pgscale-test-{os.getpid()}", env, replicas=2)
    try:
        compose.up()
        yield Stack(compose, env, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}")
    finally:
        compose.down()


def replica_requests(stack: Stack, index: int) -> float:
    """GET /items/{id} answers one replica counted, read from its own metrics port."""
    text = httpx.get(f"http://{stack.ip('api', index)}:9101/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pgscale_http_requests_total{") and "/items/{item_id}" in line
    )


@pytest.fixture(scope="module")
def scaled(stack: Stack) -> Stack:
    """`--scale api=3`: the third replica up, and haproxy sending it requests."""
    stack.compose.scale(REPLICAS)
    assert len(stack.compose.containers("api")) == REPLICAS
    before = [replica_requests(stack, i) for i in range(1, REPLICAS + 1)]

    def every_replica_served() -> bool:
        with httpx.Client(base_url=stack.lb, timeout=5) as http:
            for n in range(30):
                http.get(f"/items/{n + 1}")
        now = [replica_requests(stack, i) for i in range(1, REPLICAS + 1)]
        return all(b < a for b, a in zip(before, now, strict=True))

    assert procs.wait_until(every_replica_served, timeout=120, interval=1)
    return stack


def test_an_item_answers_through_haproxy(stack: Stack) -> None:
    """Once haproxy has resolved the replicas and seen them ready (a few checks in)."""

    def item() -> httpx.Response | None:
        try:
            return httpx.get(f"{stack.lb}/items/1", timeout=10)
        except httpx.TransportError:
            return None

    assert procs.wait_until(lambda: (r := item()) is not None and r.status_code == 200, 60)
    resp = item()
    assert resp is not None
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == 1


def test_pgbouncer_holds_every_replicas_pools_and_postgres_stays_within_its_pool(
    scaled: Stack,
) -> None:
    """3 x W x POOL_MAX clients on PgBouncer; PostgreSQL's app backends, under load,
    within PgBouncer's pool: compose.yaml's numbers through service/budget.py."""
    model = compose.load(scaled.compose.env)
    topology = environment_topology(compose.environment(model, "api"), replicas=REPLICAS)
    budget = check(topology)
    assert budget.ok, budget.problems
    assert topology.bouncer is not None
    expected = REPLICAS * topology.app.per_replica
    servers = topology.bouncer.servers_per_instance
    assert expected > servers  # many clients, few servers: the point of PgBouncer

    def app_clients() -> int:
        rows = scaled.bouncer_admin("SHOW CLIENTS")
        return sum(1 for r in rows if r["user"] == "app" and r["database"] == "app")

    assert procs.wait_until(lambda: app_clients() == expected, timeout=60, interval=1), (
        f"{app_clients()} app clients on PgBouncer, want {REPLICAS} x {WORKERS} x {POOL_MAX}"
    )
    conninfo = scaled.postgres("pgscale_exporter", scaled.env["EXPORTER_PASSWORD"], "postgres")

    def app_backends() -> int:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'"
                " AND usename = 'app' AND backend_type = 'client backend'"
            ).fetchone()
        return int(row[0]) if row else 0

    ledger, recorder = Ledger(), Recorder()
    load = Load(
        scaled.lb,
        recorder,
        ledger,
        write_items=[],
        read_ids=SEED_ITEMS,
        threads=12,
        write_share=0.0,
    )
    with load, Poll(app_backends, interval=0.2) as backends:
        assert procs.wait_until(lambda: len(backends.readings) >= 25, timeout=60)
    assert recorder.attempts(), "no load ran"
    assert 0 < max(backends.readings) <= servers, backends.readings


def test_prometheus_has_every_target_up_and_the_pool_series(scaled: Stack) -> None:
    def targets() -> list[dict[str, Any]]:
        body = httpx.get(f"{scaled.prometheus}/api/v1/targets", timeout=5).json()
        return list(body["data"]["activeTargets"])

    def all_up() -> bool:
        found = targets()
        jobs = [t["labels"]["job"] for t in found]
        return sorted(jobs) == sorted(
            ["api"] * REPLICAS + ["pgbouncer", "postgres", "prometheus"]
        ) and all(t["health"] == "up" for t in found)

    assert procs.wait_until(all_up, timeout=120, interval=2), targets()

    def series(query: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{scaled.prometheus}/api/v1/query", params={"query": query}, timeout=5)
        return list(body.json()["data"]["result"])

    def pool_series() -> bool:
        replicas = {s["metric"].get("replica") for s in series("pgscale_pool_connections")}
        return len(replicas) == REPLICAS and bool(
            series("pgbouncer_pools_client_active_connections")
        )

    assert procs.wait_until(pool_series, timeout=60, interval=2), series("pgscale_pool_connections")


def test_a_killed_pgbouncer_container_loses_no_acknowledged_write(scaled: Stack) -> None:
    """Writes under load while PgBouncer's container is killed and started again."""
    ledger, recorder = Ledger(), Recorder()
    container = scaled.compose.container("pgbouncer")
    with Load(
        scaled.lb, recorder, ledger, write_items=WRITE_ITEMS, read_ids=SEED_ITEMS, threads=4
    ) as load:
        assert procs.wait_until(lambda: len(ledger.writes()) >= 20, timeout=60)
        subprocess.run(["podman", "kill", container], check=True, capture_output=True)
        killed_at = len([w for w in ledger.writes() if w.acked])
        state = inspect(container)["State"]
        if not state["Running"]:
            subprocess.run(["podman", "start", container], check=True, capture_output=True)
        scaled.compose.wait_healthy(container)
        assert procs.wait_until(
            lambda: len([w for w in ledger.writes() if w.acked]) >= killed_at + 20, timeout=120
        )
        load.stop()
    result = audit(scaled.postgres("app", scaled.env["APP_PASSWORD"], "app"), ledger, WRITE_ITEMS)
    assert result.acknowledged > killed_at
    assert result.lost == 0, result
    assert result.duplicated == 0, result


def test_every_container_runs_as_its_non_root_user_on_a_read_only_root(scaled: Stack) -> None:
    names = scaled.compose.containers()
    assert len(names) == len(scaled.compose.plan()) + REPLICAS - 1  # and three replicas
    for name in names:
        info = inspect(name)
        declared = info["Config"]["User"]
        assert declared, f"{name} declares no user"
        assert declared.split(":")[0] not in ("root", "0"), (name, declared)
        assert info["HostConfig"]["ReadonlyRootfs"], f"{name}: writable root filesystem"
        if not info["State"]["Running"]:  # the migration, done
            assert info["State"]["ExitCode"] == 0, name
            continue
        user = declared.split(":")[0]
        flag = "-u" if user.isdigit() else "-un"
        ran = subprocess.run(
            ["podman", "exec", name, "id", flag], capture_output=True, text=True, check=True
        )
        assert ran.stdout.strip() == user, (name, ran.stdout)
        uid = subprocess.run(
            ["podman", "exec", name, "id", "-u"], capture_output=True, text=True, check=True
        )
        assert uid.stdout.strip() != "0", name
