"""Items: create, read, keyset-paginated listing, update, delete."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from psycopg.rows import DictRow
from pydantic import TypeAdapter

from service import sql
from service.coalesce import Many, One
from service.db import Database
from service.deps import app_settings, database, item_reads
from service.errors import NotFound
from service.idempotency import REPLAYED_HEADER, IdempotencyKey, once
from service.pool import Connection
from service.responses import JSONBytes
from service.schemas import (
    BIGINT_MAX,
    DecimalDigits,
    Item,
    ItemCreate,
    ItemPage,
    ItemPageRows,
    ItemRow,
    ItemUpdate,
    idempotent_write_responses,
    problem_responses,
)

router = APIRouter(
    prefix="/items", tags=["items"], responses=problem_responses(400, 404, 413, 422, 503)
)

# Reads serialize the rows straight to JSON bytes: no model is built, and FastAPI does
# not validate the answer again (response_model still documents it in OpenAPI).
ITEM_JSON = TypeAdapter(ItemRow)
PAGE_JSON = TypeAdapter(ItemPageRows)


ItemIdPath = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="The item's id."), DecimalDigits]


def read_by_id(
    db: Database,
) -> tuple[One[Connection, int, DictRow | None], Many[Connection, int, DictRow | None]]:
    """GET /items/{id}'s statements: one row by id, or for requests queued together,
    one `id = ANY(...)` for all of them (the app's wiring coalesces them)."""

    async def one(conn: Connection, item_id: int) -> DictRow | None:
        return await db.first_row_on(conn, sql.GET_ITEM, (item_id,))

    async def many(conn: Connection, item_ids: list[int]) -> list[DictRow | None]:
        rows = await db.all_rows_on(conn, sql.GET_ITEMS, (sorted(set(item_ids)),))
        found = {row["id"]: row for row in rows}
        return [found.get(item_id) for item_id in item_ids]

    return one, many


@router.post("", status_code=201, responses=idempotent_write_responses(201, REPLAYED_HEADER))
async def create_item(
    body: ItemCreate, request: Request, response: Response, key: IdempotencyKey = None
) -> Item:
    async def insert(conn: Connection) -> Item:
        cur = await conn.execute(sql.INSERT_ITEM, (body.name, body.description))
        row = await cur.fetchone()
        assert row is not None  # INSERT ... RETURNING always returns the row
        return Item.model_validate(row)

    async def write(conn: Connection) -> tuple[Item, bool]:
        return await once(conn, key, "POST /items", body, Item, insert)

    item, replayed = await database(request).transaction(write)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return item


@router.get("/{item_id}", response_model=Item)
async def get_item(item_id: ItemIdPath, request: Request) -> Response:
    row = await item_reads(request).load(item_id)
    if row is None:
        raise NotFound("item")
    return JSONBytes(ITEM_JSON.dump_json(row))  # type: ignore[arg-type]


@router.get("", response_model=ItemPage)
async def list_items(
    request: Request,
    limit: Annotated[
        int, Query(ge=1, description="Page size (at most PAGE_LIMIT_MAX)."), DecimalDigits
    ] = 20,
    after: Annotated[
        int,
        Query(ge=0, le=BIGINT_MAX, description="Return items with id above this."),
        DecimalDigits,
    ] = 0,
) -> Response:
    limit = min(limit, app_settings(request).page_limit_max)
    rows = await database(request).fetch_all(sql.LIST_ITEMS, (after, limit))
    next_after = rows[-1]["id"] if len(rows) == limit else None
    page = {"items": rows, "next_after": next_after}
    return JSONBytes(PAGE_JSON.dump_json(page))  # type: ignore[arg-type]


@router.patch("/{item_id}")
async def update_item(item_id: ItemIdPath, body: ItemUpdate, request: Request) -> Item:
    async def update(conn: Connection) -> Item | None:
        cur = await conn.execute(sql.UPDATE_ITEM, (body.name, body.description, item_id))
        row = await cur.fetchone()
        return None if row is None else Item.model_validate(row)

    item = await database(request).transaction(update)
    if item is None:
        raise NotFound("item")
    return item


@router.delete("/{item_id}", status_code=204)
async def delete_item(item_id: ItemIdPath, request: Request) -> Response:
    async def delete(conn: Connection) -> bool:
        cur = await conn.execute(sql.DELETE_ITEM, (item_id,))
        return await cur.fetchone() is not None

    if not await database(request).transaction(delete):
        raise NotFound("item")
    return Response(status_code=204)
