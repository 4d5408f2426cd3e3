"""The OpenAPI document, with integer bounds exactly as the service enforces them.

FastAPI passes its document through its own OpenAPI models, which type `minimum` and
`maximum` as floats. PostgreSQL's int8 maximum, 2**63 - 1, does not survive that: as a
float it is 2**63, one past the range, so `POST /visits` documented an `item_id` the
service refuses with a 422 (schemathesis' positive_data_acceptance sent it). Bounds
are put back as integers once, when the document is first built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.schemas import BIGINT_MAX

_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _exact_bound(value: float) -> int:
    # Every integral bound here is an int the models declared; above 2**53 a float only
    # approximates it, and the one that large is int8's maximum.
    return BIGINT_MAX if value == float(BIGINT_MAX) else int(value)


def _restore(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = _exact_bound(value)
            else:
                _restore(value)
    elif isinstance(node, list):
        for item in node:
            _restore(item)


def exact_integer_bounds(app: FastAPI) -> None:
    """Make `app.openapi()` state integral bounds as integers (int8's maximum included)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # built once, then cached on the app by FastAPI
        _restore(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
