"""What the tests share besides fixtures: the session's databases, and helpers.

The fixtures that start servers live in tests/conftest.py; everything a test imports
by name lives here, so no test imports conftest or another test module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.config import REPO, private_settings
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.postgres import Postgres
from infra.localstack.replicas import Replica
from infra.localstack.stack import Stack
from loadtests.common.prom import Scrape

APP = "app"
APP_PASSWORD = "app-test-password"
ADMIN_PASSWORD = "admin-test-password"


@dataclass
class Databases:
    """The session's PostgreSQL and PgBouncer, and how to reach them."""

    root: Path
    postgres: Postgres
    bouncer: PgBouncer

    @property
    def pooled_url(self) -> str:
        return self.bouncer.app_conninfo(APP)

    @property
    def direct_url(self) -> str:
        """The application role straight to PostgreSQL, with PgBouncer's client pair."""
        base = f"postgresql://{APP}:{APP_PASSWORD}@127.0.0.1:{self.postgres.port}/{APP}"
        tls = self.postgres.tls
        return f"{base}?{urlencode(tls.libpq(client_cert=True))}" if tls else base

    def extra_bouncer(self, name: str, upstream: int | None = None, **options: Any) -> PgBouncer:
        """Another PgBouncer on the same PostgreSQL, for tests that stop or starve it;
        `upstream`: the port it reaches PostgreSQL on, if not PostgreSQL's own (a proxy)."""
        return PgBouncer(
            self.root / name,
            procs.free_port_block(1),
            upstream or self.postgres.port,
            APP,
            users={APP: APP_PASSWORD},
            admin_password=ADMIN_PASSWORD,
            tls=self.bouncer.tls,
            **options,
        )

    @contextmanager
    def running_bouncer(
        self, name: str, upstream: int | None = None, **options: Any
    ) -> Iterator[PgBouncer]:
        """`extra_bouncer`, started for the block and stopped after it, pass or fail."""
        bouncer = self.extra_bouncer(name, upstream, **options)
        bouncer.start()
        try:
            yield bouncer
        finally:
            bouncer.stop()


def migrate(url: str, seed: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.migrate", "--seed", str(seed)],
        env={**os.environ, "DATABASE_URL": url, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )


StartService = Callable[..., Replica]


@contextmanager
def stopped(bouncer: PgBouncer) -> Iterator[None]:
    """PgBouncer stopped for the duration of the block, then started again."""
    bouncer.stop()
    try:
        yield
    finally:
        bouncer.start()


def metric_samples(url: str, name: str) -> dict[str, float]:
    """pid -> value of one gauge on a replica's metrics port."""
    return Scrape.get(url).by_pid(name)


def counter_total(url: str, name: str) -> float:
    """A counter's value on a replica's metrics port, all workers together."""
    return Scrape.get(url).total(name, "_total")


def requests_waiting(replica: Replica) -> float:
    """Requests queued for a connection on a replica now, all workers (its gauge)."""
    return sum(metric_samples(replica.metrics_url, "pgscale_pool_requests_waiting").values())


def make_items(base_url: str, count: int) -> list[int]:
    """Items of the test's own: schemathesis deletes and renames seeded ones."""
    with httpx.Client(base_url=base_url, timeout=15) as http:
        return [http.post("/items", json={"name": f"own-{i}"}).json()["id"] for i in range(count)]


@contextmanager
def running_stack(root: Path, service: dict[str, str], **settings: Any) -> Iterator[Stack]:
    """A whole private local stack in `root` on free ports (`settings` for
    private_settings), its replicas started with the `service` variables set; stopped
    on exit, pass or fail."""
    stack_settings, _ = private_settings(root, **settings)
    with pytest.MonkeyPatch.context() as env:
        for name, value in service.items():
            env.setenv(name, value)
        stack = Stack(stack_settings)
        try:
            stack.up()
            yield stack
        finally:
            stack.down()
