"""Visits: the write path (one short transaction per request) and a count."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service import sql
from service.db import Connection
from service.deps import DatabaseDep
from service.errors import InvalidReference
from service.idempotency import REPLAYED_HEADER, IdempotencyKey, once
from service.schemas import BIGINT_MAX, Visit, VisitCount, VisitCreate, problem_responses

router = APIRouter(
    prefix="/visits", tags=["visits"], responses=problem_responses(400, 413, 422, 503)
)


@router.post("", status_code=201)
async def create_visit(
    body: VisitCreate, db: DatabaseDep, response: Response, key: IdempotencyKey = None
) -> Visit:
    async def record(conn: Connection) -> Visit:
        cur = await conn.execute(sql.RECORD_VISIT, (body.item_id,))
        row = await cur.fetchone()
        if row is None:  # raised inside the transaction: it rolls back, key included
            raise InvalidReference("body.item_id", "no item with this id")
        return Visit.model_validate(row)

    async def write(conn: Connection) -> tuple[Visit, bool]:
        return await once(conn, key, "POST /visits", body, Visit, record)

    visit, replayed = await db.transaction(write)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return visit


@router.get("/count")
async def count_visits(
    db: DatabaseDep,
    item_id: Annotated[
        int | None, Query(ge=1, le=BIGINT_MAX, description="Count one item's visits only.")
    ] = None,
) -> VisitCount:
    if item_id is None:
        row = await db.fetch_one(sql.COUNT_VISITS)
    else:
        row = await db.fetch_one(sql.COUNT_ITEM_VISITS, (item_id,))
    return VisitCount(count=row["count"] if row else 0)
