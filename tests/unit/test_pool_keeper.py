"""The pool keeper's decisions, with its probe and the pool's opening stood in for."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import PoolTimeout

from service import pool as pool_module
from service.pool import GIVE_UP_AFTER, PoolKeeper
from service.settings import Settings

SETTINGS = Settings(database_url="postgresql://app@127.0.0.1:1/app", pool_min=1, pool_max=2)


def keeper_whose_probe_says(answer: bool, gave: list[str]) -> PoolKeeper:
    keeper = PoolKeeper(SETTINGS, None, on_stuck=lambda: gave.append("exit"))

    async def probe() -> bool:
        return answer

    keeper.probe = probe  # type: ignore[method-assign]
    return keeper


def test_a_failing_probe_refuses_requests_at_once_until_the_pool_has_connections() -> None:
    gave: list[str] = []
    keeper = keeper_whose_probe_says(False, gave)
    keeper.checkout_failed()  # a request found no connection: the pool may be stuck
    asyncio.run(keeper.tick())
    down = [keeper.down]
    keeper.in_use = 1  # a connection is out again: the path is back
    asyncio.run(keeper.tick())
    down.append(keeper.down)
    assert down == [True, False]
    assert gave == []


def test_a_pool_at_rest_with_nothing_wanted_is_left_alone() -> None:
    """POOL_MIN=0 at rest: no connection and no attempt is no outage, and no probe."""
    keeper = keeper_whose_probe_says(False, [])
    health = asyncio.run(keeper.tick())
    assert not keeper.down
    assert health.without_connection == 0


def test_fresh_pools_that_cannot_connect_while_the_probe_can_exit_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gave: list[str] = []
    keeper = keeper_whose_probe_says(True, gave)

    async def no_connection(pool: object, settings: Settings) -> None:
        raise PoolTimeout("no connection")

    monkeypatch.setattr(pool_module, "open_pool", no_connection)

    async def ticks() -> None:
        for _ in range(GIVE_UP_AFTER):
            keeper.checkout_failed()
            await keeper.tick()

    asyncio.run(ticks())
    assert gave == ["exit"]  # once, after GIVE_UP_AFTER fresh pools in a row
    assert keeper.replacements == 0
