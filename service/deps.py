"""Dependencies as `Annotated` aliases, so routes read like plain functions."""

from typing import Annotated

from fastapi import Depends, Request

from service.db import Database
from service.settings import Settings


def get_db(request: Request) -> Database:
    db: Database = request.state.db
    return db


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DatabaseDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
