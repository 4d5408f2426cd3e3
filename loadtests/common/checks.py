"""Response validation: the statuses a scenario expects, and 503s the service sheds on purpose.

Under deliberate saturation the service answers 503 with `Retry-After` and a
problem+json body (README.md, "Errors"): that is the behaviour under test, not a
failure. Such answers are marked successful but counted by request name; workers hand
their counts to the master with their stats reports, so the master's totals cover the
whole run. Any other status outside the expected ones is a failure.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from locust import events
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtests.common.hooks import on

logger = logging.getLogger("loadtests.checks")

PROBLEM_JSON = "application/problem+json"
_REPORT_KEY = "pgscale_saturated"

# Shed answers by request name, since the start of the run (or the last stats reset).
saturated: Counter[str] = Counter()


def is_shed(resp: ResponseContextManager) -> bool:
    """A 503 the service sent on purpose: Retry-After set, body a problem+json document."""
    headers = resp.headers
    if resp.status_code != 503 or headers is None:
        return False
    content_type = str(headers.get("Content-Type") or "")
    return bool(headers.get("Retry-After")) and content_type.startswith(PROBLEM_JSON)


def _success(resp: ResponseContextManager) -> None:
    resp.success()  # type: ignore[no-untyped-call]


def _failure(resp: ResponseContextManager, reason: str) -> None:
    resp.failure(reason)  # type: ignore[no-untyped-call]


def expect(resp: ResponseContextManager, *statuses: int) -> bool:
    """Judge a `catch_response=True` response; True when its status is one of `statuses`.

    A shed 503 counts as a success (and is tallied); anything else is a failure that
    names the status and the start of the body, so Locust's failure table says why.
    """
    if resp.status_code in statuses:
        _success(resp)
        return True
    if is_shed(resp):
        saturated[str(resp.request_meta["name"])] += 1
        _success(resp)
        return False
    body = (resp.text or "").strip().replace("\n", " ")[:200]
    _failure(resp, f"HTTP {resp.status_code}, expected {'/'.join(map(str, statuses))}: {body}")
    return False


def json_body(resp: ResponseContextManager) -> Any:
    """The decoded body, or None (and a failure) when it is not JSON."""
    try:
        return resp.json()
    except ValueError:
        _failure(resp, "response body is not JSON")
        return None


def total_saturated() -> int:
    return sum(saturated.values())


@on(events.report_to_master)
def _send_counts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data[_REPORT_KEY] = dict(saturated)
    saturated.clear()


@on(events.worker_report)
def _add_counts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    saturated.update(data.get(_REPORT_KEY, {}))


@on(events.reset_stats)
def _reset(**_: Any) -> None:
    saturated.clear()


@on(events.quitting)
def _summary(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not saturated:
        return
    detail = ", ".join(f"{name}: {count}" for name, count in sorted(saturated.items()))
    logger.info(
        "%d responses were 503s shed on purpose (counted as expected): %s",
        total_saturated(),
        detail,
    )
