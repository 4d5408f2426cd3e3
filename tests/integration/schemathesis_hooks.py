"""Schemathesis hooks for tests/integration/test_schemathesis.py, loaded through SCHEMATHESIS_HOOKS.

Two answers depend on what the database holds, which no schema can describe; the
OpenAPI document states both in prose (the 422's description):

- An Idempotency-Key names one request. Schemathesis draws keys from a small space and
  sends one again with another body (refused with a 422, as the IETF Idempotency-Key
  draft says), or with the same body after the item it created was deleted (the
  replayed 201 then names a gone item, which ensure_resource_availability reports).
  A client must not reuse a key for another request, so `before_call` gives every
  valid drawn key a run-unique value; invalid ones go out as drawn, to be refused.
  tests/integration/test_api.py and test_idempotency.py test the reuse answers
  themselves.
- `POST /visits` for an `item_id` no item has is a 422 naming `body.item_id`: most
  drawn ids. `filter_failure` drops exactly that answer when positive_data_acceptance
  calls it a valid request rejected; every other failure stands.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from typing import Any

import schemathesis
from schemathesis import HookContext
from schemathesis.core.failures import Failure
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.openapi.checks import RejectedPositiveData

KEY = "Idempotency-Key"
VALID_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # as service/idempotency.py declares it
RUN = uuid.uuid4().hex
_sent = itertools.count()
NO_SUCH_ITEM = {"field": "body.item_id", "message": "no item with this id"}


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    """One key per request, as a client uses them, where the drawn key is valid."""
    key = case.headers.get(KEY)  # a case-insensitive dict, always present
    if isinstance(key, str) and VALID_KEY.fullmatch(key):
        case.headers[KEY] = f"schemathesis-{RUN}-{next(_sent)}"


def is_missing_item(failure: Failure, response: Response) -> bool:
    """The documented 422 for a visit to an item that does not exist."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 422:
        return False
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("errors") == [NO_SUCH_ITEM]


@schemathesis.hook
def filter_failure(
    context: HookContext, failure: Failure, case: Case[Any], response: Response
) -> bool:
    """Keep every failure but a visit refused for want of its item."""
    return not is_missing_item(failure, response)
