"""Settings are validated at start, with messages that name the variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_are_valid() -> None:
    settings = Settings()
    assert settings.pool_min <= settings.pool_max
    assert settings.pool_timeout < settings.db_deadline


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_MAX", "7")
    monkeypatch.setenv("POOL_TIMEOUT", "0.25")
    monkeypatch.setenv("WORKERS", "")  # empty means "use the default", as make passes it
    settings = Settings()
    assert settings.pool_max == 7
    assert settings.pool_timeout == 0.25
    assert settings.workers == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool_min": 5, "pool_max": 2}, "POOL_MIN (5) must not exceed POOL_MAX (2)"),
        ({"pool_timeout": 9, "db_deadline": 8}, "POOL_TIMEOUT (9.0s) must be below DB_DEADLINE"),
        ({"statement_timeout": 8, "db_deadline": 8}, "STATEMENT_TIMEOUT (8.0s) must be below"),
        (
            {"db_login_retry_window": 8, "db_deadline": 8},
            "DB_LOGIN_RETRY_WINDOW (8.0s) must be below DB_DEADLINE",
        ),
        ({"pool_max": 0}, "pool_max"),
        ({"database_url": "mysql://x@y/z"}, "database_url"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**overrides)  # type: ignore[arg-type]


def test_a_pool_that_cannot_connect_fails_its_open_in_time() -> None:
    """A pool that cannot connect fails its open within POOL_OPEN_TIMEOUT (the keeper
    then asks its probe why: service/pool.py)."""
    import asyncio
    import time

    from psycopg_pool import PoolTimeout

    from service.pool import create_pool, open_pool

    settings = Settings(database_url="postgresql://app@127.0.0.1:1/app", pool_open_timeout=1)

    async def open_it() -> None:
        pool = create_pool(settings, None)
        try:
            await open_pool(pool, settings)
        finally:
            await pool.close()

    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        asyncio.run(open_it())
    assert time.monotonic() - started < 5
