"""Request and response bodies: what the API accepts and returns, and the limits on it."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from service.errors import UNAVAILABLE

BIGINT_MAX = 2**63 - 1
_DECIMAL = re.compile(r"-?[0-9]+")


def _decimal_digits(value: object) -> object:
    # Path and query values arrive as text, and pydantic's lax integer parsing also takes
    # " 5", "+5" (a query's "+" is a space), "5.0" and "1_000". A client writing those
    # meant something else; an integer here is an optional minus and ASCII digits.
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise PydanticCustomError("int_parsing", "Input should be an integer in decimal digits")
    return value


DecimalDigits = BeforeValidator(_decimal_digits)
"""Metadata for an `int` path or query parameter: plain decimal digits only."""


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it as bad input rather than fail later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _whole_number(value: object) -> object:
    # JSON has one number type, and JSON Schema's `integer` takes 6892.0 as 6892; the
    # strict bodies refuse everything else that is not an int: true, "1", 1.5.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The same rule for the OpenAPI document (an ECMA-262 pattern, as JSON Schema uses).
_NO_NUL = {"pattern": "^[^\\x00]*$"}
Name = Annotated[
    str, Field(min_length=1, max_length=200, json_schema_extra=_NO_NUL), AfterValidator(_no_nul)
]
Description = Annotated[
    str, Field(max_length=2000, json_schema_extra=_NO_NUL), AfterValidator(_no_nul)
]
ItemId = Annotated[int, Field(ge=1, le=BIGINT_MAX), BeforeValidator(_whole_number)]


class Strict(BaseModel):
    """Bodies reject unknown fields, so a typo is a 422 and not a silent no-op, and take
    JSON types as they are: `true` or `"1"` for an id is a 422, not item 1."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ItemCreate(Strict):
    name: Name
    description: Description = ""


class ItemUpdate(Strict):
    """At least one field to change; a field absent or null is left as it is."""

    # What `_not_empty` refuses, said in the schema: `{}` and all-null bodies.
    model_config = ConfigDict(
        json_schema_extra={
            "minProperties": 1,
            "anyOf": [
                {"required": [field], "properties": {field: {"type": "string"}}}
                for field in ("name", "description")
            ],
        }
    )

    name: Name | None = None
    description: Description | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ItemUpdate:
        if self.name is None and self.description is None:
            raise ValueError("give at least one of name, description")
        return self


class Item(BaseModel):
    id: int
    name: str
    description: str
    visits: int
    created_at: datetime
    updated_at: datetime


class ItemRow(TypedDict):
    """An item as the database returns it, serialized without building a model."""

    id: int
    name: str
    description: str
    visits: int
    created_at: datetime
    updated_at: datetime


class ItemPageRows(TypedDict):
    """A page as the route assembles it from rows."""

    items: list[ItemRow]
    next_after: int | None


class ItemPage(BaseModel):
    items: list[Item]
    next_after: int | None = Field(
        description="Pass as `after` to read the next page; null on the last page."
    )


class VisitCreate(Strict):
    item_id: ItemId


class Visit(BaseModel):
    id: int
    item_id: int
    created_at: datetime


class VisitRow(TypedDict):
    """A visit as the database returns it, serialized without building a model."""

    id: int
    item_id: int
    created_at: datetime


class VisitCount(BaseModel):
    count: int


class Health(BaseModel):
    status: str


class FieldError(BaseModel):
    field: str = Field(description="Where: `body.name`, `query.limit`, `path.item_id`, ...")
    message: str


class Problem(BaseModel):
    """An error, as `application/problem+json` (RFC 9457). Never carries the input."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="Invalid fields (422).")
    request_id: str | None = Field(
        default=None,
        description="The request's id, as in its X-Request-ID header and the server's log lines.",
    )


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_DESCRIPTIONS = {
    400: "The body could not be read (not UTF-8).",
    404: "No such resource.",
    405: "Method not allowed.",
    413: "Request body over MAX_BODY_BYTES.",
    422: "Invalid input; `errors` names each field.",
    503: "The database cannot serve the request now; `detail` says why: "
    + "; ".join(dict.fromkeys(kind.detail for kind in UNAVAILABLE))
    + ". Retry after `Retry-After` seconds.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the problems a route can answer with."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": _PROBLEM,
        }
        if status == 503:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            }
        responses[status] = entry
    return responses


def idempotent_write_responses(
    status: int, replayed_header: str, refused_also: str = ""
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a write that takes an Idempotency-Key (service/idempotency.py):
    its replay, and a key reused for another request refused (with `refused_also`, the
    route's own other 422s)."""
    refused = problem_responses(422)[422]
    return {
        status: {
            "description": "Done; a repeat with the same Idempotency-Key and body gets this"
            f" same answer again, with `{replayed_header}: true`.",
            "headers": {
                replayed_header: {
                    "description": "Present on a replay of an earlier answer.",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        },
        422: {
            **refused,
            "description": f"{refused['description']} Also the answer to an Idempotency-Key"
            " already used for a different request (another body or another route):"
            f" `errors` names `header.Idempotency-Key`.{refused_also}",
        },
    }
