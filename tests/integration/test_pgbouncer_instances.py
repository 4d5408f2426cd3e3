"""Several PgBouncers behind one multi-host URL: what the replicas rely on.

`make up PGBOUNCER_INSTANCES=N` gives the replicas one libpq URL naming every instance,
with load_balance_hosts=random. Two claims make that the right choice over one shared
port (so_reuseport, whose PgBouncer 1.18 cannot forward a cancel request to a peer):
a cancel request goes to the instance that runs the statement, and a dead instance
costs a new connection nothing but a refused attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from infra.localstack import procs
from infra.localstack.pgbouncer import PgBouncer
from tests.support.stack import APP, APP_PASSWORD, Databases


@pytest.fixture(scope="module")
def two(databases: Databases) -> Iterator[tuple[PgBouncer, PgBouncer]]:
    with (
        databases.running_bouncer("instances-1") as first,
        databases.running_bouncer("instances-2") as second,
    ):
        yield first, second


def url(*bouncers: PgBouncer, balance: str) -> str:
    hosts = ",".join(f"127.0.0.1:{b.port}" for b in bouncers)
    return (
        f"postgresql://{APP}:{APP_PASSWORD}@{hosts}/{APP}"
        f"?load_balance_hosts={balance}&connect_timeout=3"
    )


def running_sleeps(direct_url: str) -> int:
    with psycopg.connect(direct_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(30)%'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("first", [0, 1])
def test_a_cancel_reaches_the_instance_running_the_statement(
    databases: Databases, two: tuple[PgBouncer, PgBouncer], first: int
) -> None:
    """Whichever instance the connection landed on, its cancel stops the statement."""
    order = (two[first], two[1 - first])
    # `disable` tries the hosts in order: the test picks the instance, the URL is the same.
    with psycopg.connect(url(*order, balance="disable"), autocommit=True) as conn:
        assert conn.info.port == order[0].port
        failed: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.Error as exc:
                failed.append(exc)

        thread = threading.Thread(target=sleep)
        thread.start()
        assert procs.wait_until(lambda: running_sleeps(databases.direct_url) == 1, 10)
        conn.cancel_safe(timeout=5)
        thread.join(15)
        assert not thread.is_alive(), "the statement ran on: the cancel went astray"
    assert len(failed) == 1
    assert isinstance(failed[0], psycopg.errors.QueryCanceled)
    assert "canceling statement due to user request" in str(failed[0])
    assert procs.wait_until(lambda: running_sleeps(databases.direct_url) == 0, 10)


def test_with_one_instance_down_every_connection_lands_on_the_other(
    two: tuple[PgBouncer, PgBouncer],
) -> None:
    first, second = two
    second.stop()
    try:
        ports = set()
        for _ in range(10):
            with psycopg.connect(url(first, second, balance="random"), autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                ports.add(conn.info.port)
        assert ports == {first.port}
    finally:
        second.start()


def test_random_balancing_uses_both_instances(two: tuple[PgBouncer, PgBouncer]) -> None:
    """40 connections, each instance picked with p = 1/2: all on one has p = 2^-39."""
    ports = set()
    for _ in range(40):
        with psycopg.connect(url(*two, balance="random"), autocommit=True) as conn:
            ports.add(conn.info.port)
    assert ports == {two[0].port, two[1].port}
