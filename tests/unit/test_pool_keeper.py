"""The pool keeper's decisions, with its probe and the pool's opening stood in for."""

from __future__ import annotations

import asyncio
import itertools

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from service import pool as pool_module
from service.pool import (
    GIVE_UP_AFTER,
    MAX_REPEAT_WAIT,
    DatabaseRefused,
    PoolKeeper,
    login_failing,
    login_retry_waits,
    refusal,
)
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


def test_a_fresh_pool_lost_to_the_path_going_down_again_is_no_stuck_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outages in quick succession: the probe passes, the fresh pool fails, and a second
    probe finds the path down again. That is an outage, and counts for no exit."""
    gave: list[str] = []
    keeper = PoolKeeper(SETTINGS, None, on_stuck=lambda: gave.append("exit"))
    answers = iter([True, False] * GIVE_UP_AFTER)

    async def probe() -> bool:
        return next(answers)

    async def no_connection(pool: object, settings: Settings) -> None:
        raise PoolTimeout("no connection")

    keeper.probe = probe  # type: ignore[method-assign]
    monkeypatch.setattr(pool_module, "open_pool", no_connection)

    async def ticks() -> list[bool]:
        down = []
        for _ in range(GIVE_UP_AFTER):
            keeper.checkout_failed()
            await keeper.tick()
            down.append(keeper.down)
        return down

    assert asyncio.run(ticks()) == [True] * GIVE_UP_AFTER
    assert gave == []


# What libpq 18, PgBouncer 1.18 and PostgreSQL 15 said here, connecting with each fault.
REFUSED = [
    'connection to server at "127.0.0.1", port 6432 failed: FATAL:  SASL authentication failed',
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication'
    ' failed for user "app"',
    'connection to server at "127.0.0.1", port 6432 failed: FATAL:  no such database: nodb',
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "nodb" does not exist',
    'connection to server at "127.0.0.1", port 6432 failed: SSL error: certificate verify failed',
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  connection requires a valid'
    " client certificate",
    'connection to server at "127.0.0.1", port 6432 failed: root certificate file "/nonexist" does'
    " not exist",
    'connection is bad: invalid sslmode value: "wat"',
]
DOWN = [
    'connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the server'
    " running on that host and accepting TCP/IP connections?",
    "failed to resolve host 'pgbouncer': [Errno -2] Name or service not known",
    'connection to server at "127.0.0.1", port 6432 failed: timeout expired',
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database system is'
    " starting up",
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many clients'
    " already",
    'connection to server at "127.0.0.1", port 6432 failed: FATAL:  no more connections allowed'
    " (max_client_conn)",
    'connection to server at "127.0.0.1", port 6432 failed: server closed the connection'
    " unexpectedly",
]


@pytest.mark.parametrize("message", REFUSED)
def test_settings_the_database_refuses_are_told_from_a_path_that_is_down(message: str) -> None:
    assert refusal(psycopg.OperationalError(f"connection failed: {message}"))


@pytest.mark.parametrize("message", DOWN)
def test_a_path_that_is_down_is_no_refusal(message: str) -> None:
    assert not refusal(psycopg.OperationalError(f"connection failed: {message}"))


def test_a_conninfo_libpq_cannot_parse_is_a_refusal() -> None:
    assert refusal(psycopg.ProgrammingError('invalid connection option "bogus"'))


def test_a_worker_started_while_the_path_is_down_starts_not_ready() -> None:
    """Nothing listens on port 1: the open times out, the keeper starts down, no error."""
    settings = Settings(database_url=SETTINGS.database_url, pool_min=1, pool_open_timeout=0.5)

    async def start() -> tuple[bool, bool]:
        keeper = PoolKeeper(settings, None)
        try:
            await keeper.open()
            return keeper.down, keeper.pool.closed
        finally:
            await keeper.close()

    assert asyncio.run(start()) == (True, False)  # down, with a pool that keeps trying


def test_a_worker_whose_settings_are_refused_fails_its_start() -> None:
    settings = Settings(database_url=SETTINGS.database_url, pool_min=1, pool_open_timeout=0.5)
    keeper = PoolKeeper(settings, None)

    async def refused() -> Exception:
        return psycopg.OperationalError("connection failed: FATAL:  SASL authentication failed")

    keeper.probe_error = refused  # type: ignore[method-assign]

    async def start() -> None:
        try:
            await keeper.open()
        finally:
            await keeper.close()

    with pytest.raises(DatabaseRefused, match=r"refuses these settings: .*SASL authentication"):
        asyncio.run(start())


# PgBouncer's refusal while its server logins fail: 1.18's words (seen here), and the
# words of later releases, which add the login's own error.
LOGIN_FAILING = [
    "server login has been failing, try again later (server_login_retry)",
    "server login has been failing, cached error: connect failed (server_login_retry)",
]


@pytest.mark.parametrize("message", LOGIN_FAILING)
def test_pgbouncers_refusal_while_its_logins_fail_is_told_apart(message: str) -> None:
    error = psycopg.OperationalError(message)
    assert login_failing(error)
    assert not refusal(error)  # a worker starting in the window starts, not ready


@pytest.mark.parametrize("message", REFUSED + DOWN)
def test_other_failures_are_not_pgbouncers_refusal_while_its_logins_fail(message: str) -> None:
    assert not login_failing(psycopg.OperationalError(f"connection failed: {message}"))


@pytest.mark.parametrize("window", [0.0, 0.05, 0.3, 2.0, 7.25])
def test_repeat_pauses_double_up_to_their_cap_and_fill_the_window(window: float) -> None:
    waits = list(login_retry_waits(window))
    assert sum(waits) == pytest.approx(window)
    assert all(0 < w <= MAX_REPEAT_WAIT for w in waits)
    # Each pause doubles the one before, until the cap (the last may be cut short).
    assert all(b == min(2 * a, MAX_REPEAT_WAIT) for a, b in itertools.pairwise(waits[:-1]))


def probed_with(answers: list[Exception | None], window: float) -> tuple[Exception | None, int]:
    """What the keeper's probe says when its attempts answer `answers` in turn."""
    keeper = PoolKeeper(SETTINGS.model_copy(update={"db_login_retry_window": window}), None)
    asked = iter(answers)
    count = 0

    async def once() -> None:
        nonlocal count
        count += 1
        answer = next(asked)
        if answer is not None:
            raise answer

    keeper._probe_once = once  # type: ignore[method-assign]
    return asyncio.run(keeper.probe_error()), count


def test_the_probe_waits_out_pgbouncers_refusal_window_before_it_says_down() -> None:
    refused = psycopg.OperationalError(LOGIN_FAILING[0])
    assert probed_with([refused, refused, None], window=1.0) == (None, 3)
    error, attempts = probed_with([refused] * 100, window=0.2)
    assert error is refused
    assert attempts == len(list(login_retry_waits(0.2))) + 1


def test_any_other_probe_failure_says_down_at_once() -> None:
    down = psycopg.OperationalError("connection failed: Connection refused")
    assert probed_with([down, None], window=1.0) == (down, 1)
