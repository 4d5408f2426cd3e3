"""Visits: the write path (one short transaction per request) and a count."""

from typing import Annotated

from fastapi import APIRouter, Query

from service import sql
from service.db import Connection
from service.deps import DatabaseDep
from service.errors import InvalidReference
from service.schemas import BIGINT_MAX, Visit, VisitCount, VisitCreate

router = APIRouter(prefix="/visits", tags=["visits"])


@router.post("", status_code=201)
async def create_visit(body: VisitCreate, db: DatabaseDep) -> Visit:
    async def record(conn: Connection) -> Visit | None:
        cur = await conn.execute(sql.RECORD_VISIT, (body.item_id,))
        row = await cur.fetchone()
        return None if row is None else Visit.model_validate(row)

    visit = await db.transaction(record)
    if visit is None:
        raise InvalidReference("body.item_id", "no item with this id")
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
