"""The Unavailable family: one kind per reason for a 503, and every cause mapped once."""

from __future__ import annotations

import psycopg
import pytest
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from service.errors import (
    UNAVAILABLE,
    DatabaseUnreachable,
    NoConnectionInTime,
    ShuttingDown,
    StatementTimedOut,
    TooManyWaiting,
    Unavailable,
)
from service.schemas import problem_responses


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (PoolTimeout("no connection"), NoConnectionInTime),
        (TooManyRequests("queue full"), TooManyWaiting),
        (PoolClosed("closed"), ShuttingDown),
        # QueryCanceled is an OperationalError: the more specific kind wins.
        (psycopg.errors.QueryCanceled("cancelled"), StatementTimedOut),
        (psycopg.OperationalError("connection refused"), DatabaseUnreachable),
        (NoConnectionInTime(), NoConnectionInTime),
    ],
)
def test_every_cause_has_its_kind(raised: Exception, kind: type[Unavailable]) -> None:
    assert Unavailable.kind_of(raised) is kind


def test_other_errors_are_no_kind_of_unavailability() -> None:
    assert Unavailable.kind_of(ValueError("a bug")) is None
    assert Unavailable.kind_of(psycopg.errors.UniqueViolation("duplicate")) is None


def test_every_kind_speaks_for_itself_and_the_api_document_lists_them() -> None:
    description = problem_responses(503)[503]["description"]
    for kind in UNAVAILABLE:
        assert kind.detail, kind
        assert kind.log, kind
        assert kind.detail in description
