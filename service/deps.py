"""The worker's database and settings, reached from the request.

Plain functions of the `Request`, not FastAPI dependencies: every `Depends` is a
sub-dependency FastAPI solves on each request, which `make bench` measured at about a
fifth of a worker's CPU on `GET /items/{id}` for what is one attribute lookup.
"""

from fastapi import Request
from psycopg.rows import DictRow

from service.coalesce import Coalescer
from service.db import Database
from service.pool import Connection
from service.settings import Settings

# The two coalesced kinds, both keyed by an item id (service/coalesce.py).
ItemReads = Coalescer[Connection, int, DictRow | None]
VisitWrites = Coalescer[Connection, int, DictRow | None]


def database(request: Request) -> Database:
    """The worker's Database, set up by the app's lifespan."""
    db: Database = request.state.db
    return db


def item_reads(request: Request) -> ItemReads:
    """The worker's GET /items/{id} reads, coalesced when they queue together."""
    reads: ItemReads = request.state.item_reads
    return reads


def visit_writes(request: Request) -> VisitWrites:
    """The worker's POST /visits writes without a key, coalesced likewise."""
    writes: VisitWrites = request.state.visit_writes
    return writes


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
