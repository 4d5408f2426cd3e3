"""Reads and one-statement writes bind their values on the client, as one
simple-protocol message, and safely.

Each test runs the service's own Database on a pool of one connection and records that
connection's protocol messages with libpq's trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from psycopg import pq
from psycopg.rows import DictRow

from service import sql
from service.app import coalesced
from service.db import Database
from service.pool import PoolKeeper
from service.prepared import prepare_threshold
from service.routes.visits import record_by_item
from service.settings import DeploymentSettings, Settings
from tests.support.stack import Databases

T = TypeVar("T")

HOSTILE = "O'Reilly'); DROP TABLE items; -- \\ $$ %s"


def traced(
    settings: Settings, trace: Path, work: Callable[[Database], Awaitable[T]]
) -> tuple[T, list[str]]:
    """Run `work` on a Database of one pooled connection; return its result and the
    names of the messages the client sent while it ran."""

    async def scenario() -> T:
        keeper = PoolKeeper(settings, prepare_threshold(settings, DeploymentSettings()))
        await keeper.open()
        pool = keeper.pool
        try:
            db = Database(keeper, settings)
            async with pool.connection() as conn:  # the only one: every read uses it
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                return await work(db)
            finally:
                async with pool.connection() as conn:
                    conn.pgconn.untrace()
        finally:
            await keeper.close()

    with trace.open("w") as out:
        result = asyncio.run(scenario())
    # Each line: direction (F: from the client), length, message name, contents. The
    # pool's liveness check at the first checkout (an empty query) is left out.
    lines = (line.split("\t") for line in trace.read_text().splitlines())
    sent = [fields[2:4] for fields in lines if len(fields) > 2 and fields[0] == "F"]
    return result, [message[0] for message in sent if message != ["Query", ' ""']]


def one_connection(url: str, **settings: object) -> Settings:
    return Settings(database_url=url, pool_min=1, pool_max=1, **settings)  # type: ignore[arg-type]


async def read_item(db: Database) -> DictRow | None:
    return await db.fetch_one(sql.GET_ITEM, (1,))


async def record_visit(db: Database) -> DictRow | None:
    """A lone POST /visits without a key, the way the route runs it."""
    return await coalesced(db, "visits", db.write, record_by_item(db)).load(1)


@pytest.mark.parametrize(
    ("call", "column", "texts"),
    [
        (read_item, "id", ["WHERE id = 1\n"]),
        (record_visit, "item_id", ["BEGIN; SET LOCAL statement_timeout", "id = 1 ", '; COMMIT"']),
    ],
    ids=["read", "write"],
)
def test_a_statement_through_pgbouncer_is_one_query_message(
    databases: Databases,
    tmp_path: Path,
    call: Callable[[Database], Awaitable[DictRow | None]],
    column: str,
    texts: list[str],
) -> None:
    """Not Parse, Bind, Describe, Execute and Sync; a write's transaction travels along."""
    row, sent = traced(one_connection(databases.pooled_url), tmp_path / "trace", call)
    assert row is not None
    assert row[column] == 1
    assert sent == ["Query"]
    message = (tmp_path / "trace").read_text()
    for text in texts:  # the value is in the text: bound client-side
        assert text in message


def test_client_side_binding_quotes_every_value(databases: Databases, tmp_path: Path) -> None:
    async def read_back(db: Database) -> list[object]:
        one = await db.fetch_one("SELECT %s::text AS v, %s::bigint AS n", (HOSTILE, -7))
        rows = await db.fetch_all("SELECT count(*) AS n FROM items WHERE name = %s", (HOSTILE,))
        return [one, rows]

    (one, rows), sent = traced(one_connection(databases.pooled_url), tmp_path / "trace", read_back)
    assert one == {"v": HOSTILE, "n": -7}
    assert rows == [{"n": 0}]  # and the table is still there to count
    assert "Parse" not in sent


def test_reads_are_prepared_where_that_is_safe(
    databases: Databases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct to PostgreSQL with PREPARED_STATEMENTS on, psycopg prepares a repeated read."""
    monkeypatch.setenv("VIA_PGBOUNCER", "false")

    async def read_often(db: Database) -> bool:
        assert not db.client_binding
        for _ in range(8):
            assert await db.fetch_one(sql.GET_ITEM, (1,)) is not None
        return True

    _, sent = traced(
        one_connection(databases.direct_url, prepared_statements=True),
        tmp_path / "trace",
        read_often,
    )
    assert "Query" not in sent
    assert sent.count("Bind") == 8
    assert 1 <= sent.count("Parse") < 8  # some reads reused the prepared statement
