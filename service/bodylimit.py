"""Refuse request bodies above MAX_BODY_BYTES with 413, before the app reads them.

Checks the declared Content-Length first, then counts streamed bytes, so a chunked
upload cannot slip past the limit either. (FastAPI's own `max_body_size` answers a
declared oversize body in text/plain, outside our problem+json handlers.)
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem


class BodyTooLarge(HTTPException):
    """The body grew past the limit while streaming.

    An HTTPException, so FastAPI's body parsing hands it to our handlers instead of
    turning it into a 400.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


class BodySizeLimit:
    """Pure ASGI middleware (BaseHTTPMiddleware would cost more per request)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value) > self.max_bytes
                except ValueError:
                    return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_too_large(scope):
            too_large = BodyTooLarge(self.max_bytes)
            response = problem(413, "Content Too Large", too_large.detail)
            await response(scope, receive, send)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
