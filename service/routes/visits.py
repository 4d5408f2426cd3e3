"""Visits: the write path (one short transaction per request) and a count."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from psycopg.rows import DictRow
from pydantic import TypeAdapter

from service import sql
from service.coalesce import Many, One
from service.db import Database
from service.deps import database, visit_writes
from service.errors import MissingReference
from service.idempotency import REPLAYED_HEADER, IdempotencyKey, once
from service.pool import Connection
from service.responses import JSONBytes
from service.schemas import (
    BIGINT_MAX,
    DecimalDigits,
    Visit,
    VisitCount,
    VisitCreate,
    VisitRow,
    idempotent_write_responses,
    problem_responses,
)

VISIT_JSON = TypeAdapter(VisitRow)


def record_by_item(
    db: Database,
) -> tuple[One[Connection, int, DictRow | None], Many[Connection, int, DictRow | None]]:
    """POST /visits' statements without a key: one visit in its own transaction, or for requests
    queued together, one transaction for all of them (sql.RECORD_VISITS). Each request
    gets its own visit, or None when its item does not exist; a batch that fails
    commits nothing and fails every request in it."""

    async def one(conn: Connection, item_id: int) -> DictRow | None:
        rows = await db.run_framed(conn, sql.RECORD_VISIT, (item_id,))
        return rows[0] if rows else None

    async def many(conn: Connection, item_ids: list[int]) -> list[DictRow | None]:
        rows = await db.run_framed(conn, sql.RECORD_VISITS, (sorted(set(item_ids)), item_ids))
        by_item: dict[int, list[DictRow]] = {}
        for row in rows:
            by_item.setdefault(row["item_id"], []).append(row)
        return [by_item[i].pop() if by_item.get(i) else None for i in item_ids]

    return one, many


router = APIRouter(
    prefix="/visits", tags=["visits"], responses=problem_responses(400, 413, 422, 503)
)


@router.post(
    "",
    status_code=201,
    response_model=Visit,
    responses=idempotent_write_responses(
        201, REPLAYED_HEADER, " And `body.item_id` when no item has that id."
    ),
)
async def create_visit(body: VisitCreate, request: Request, key: IdempotencyKey = None) -> Response:
    db = database(request)
    if key is None:
        # The common case: one round trip, shared with the visits that queued with it.
        # A missing item makes the UPDATE match no row, so nothing is inserted for it.
        row = await visit_writes(request).load(body.item_id)
        if row is None:
            raise MissingReference("body.item_id", "no item with this id")
        return JSONBytes(VISIT_JSON.dump_json(row), status_code=201)  # type: ignore[arg-type]

    async def record(conn: Connection) -> Visit:
        cur = await conn.execute(sql.RECORD_VISIT, (body.item_id,))
        row = await cur.fetchone()
        if row is None:  # raised inside the transaction: it rolls back, key included
            raise MissingReference("body.item_id", "no item with this id")
        return Visit.model_validate(row)

    async def write(conn: Connection) -> tuple[Visit, bool]:
        return await once(conn, key, "POST /visits", body, Visit, record)

    visit, replayed = await db.transaction(write)
    headers = {REPLAYED_HEADER: "true"} if replayed else None
    return JSONBytes(visit.model_dump_json().encode(), status_code=201, headers=headers)


@router.get("/count")
async def count_visits(
    request: Request,
    item_id: Annotated[
        int | None,
        Query(ge=1, le=BIGINT_MAX, description="Count one item's visits only."),
        DecimalDigits,
    ] = None,
) -> VisitCount:
    db = database(request)
    if item_id is None:
        row = await db.fetch_one(sql.COUNT_VISITS)
    else:
        row = await db.fetch_one(sql.COUNT_ITEM_VISITS, (item_id,))
    return VisitCount(count=row["count"] if row else 0)
