"""Idempotency-Key on POST: a client retrying a write after a timeout creates nothing twice.

The key is claimed in the write's own transaction (`INSERT ... ON CONFLICT DO NOTHING`)
and the response stored beside it, so the write and its record commit or vanish
together. A repeat with the same key and body gets the stored response back (header
`Idempotent-Replayed: true`); the same key with another body or on another route is a
422. A write that fails rolls back its claim, so the key can be retried. A concurrent
repeat waits on the key's row lock until the first one commits, then replays it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Header
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from service.errors import KeyReused
from service.pool import Connection

M = TypeVar("M", bound=BaseModel)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Any printable ASCII string: a retry with the same key replays the answer.",
    ),
]

REPLAYED_HEADER = "Idempotent-Replayed"

CLAIM = """
    INSERT INTO idempotency_keys (key, scope, fingerprint) VALUES (%s, %s, %s)
    ON CONFLICT (key) DO NOTHING RETURNING key
"""
STORED = "SELECT scope, fingerprint, response FROM idempotency_keys WHERE key = %s"
STORE = "UPDATE idempotency_keys SET response = %s WHERE key = %s"


def fingerprint(body: BaseModel) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


async def once(
    conn: Connection,
    key: str | None,
    scope: str,
    body: BaseModel,
    model: type[M],
    work: Callable[[Connection], Awaitable[M]],
) -> tuple[M, bool]:
    """Run `work` once per key inside the caller's transaction; True when replayed."""
    if key is None:
        return await work(conn), False
    print_ = fingerprint(body)
    claimed = await (await conn.execute(CLAIM, (key, scope, print_))).fetchone()
    if claimed is None:
        row = await (await conn.execute(STORED, (key,))).fetchone()
        if row is None or row["scope"] != scope or row["fingerprint"] != print_:
            raise KeyReused("header.Idempotency-Key", "already used for a different request")
        return model.model_validate(row["response"]), True
    result = await work(conn)
    await conn.execute(STORE, (Jsonb(result.model_dump(mode="json")), key))
    return result, False
