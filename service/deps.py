"""Dependencies as `Annotated` aliases, so routes read like plain functions.

They are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a
thread hop per request for what is an attribute lookup.
"""

from typing import Annotated

from fastapi import Depends, Request

from service.db import Database
from service.settings import Settings


async def get_db(request: Request) -> Database:
    db: Database = request.state.db
    return db


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DatabaseDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
