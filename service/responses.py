"""Answers the routes have already serialized to JSON bytes.

The hot paths dump database rows straight to JSON through a TypedDict adapter: no
model is built, and FastAPI does not validate the answer a second time (each route's
`response_model` still documents it in OpenAPI).
"""

from starlette.responses import Response


class JSONBytes(Response):
    """JSON the route has already serialized."""

    media_type = "application/json"
