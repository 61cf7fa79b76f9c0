"""Pure ASGI middleware (streams pass through untouched): the request id, and the last-resort 500.

Starlette's own handler for unexpected exceptions sends its 500 and then re-raises, so uvicorn logs
"Exception in ASGI application" and drops the kept-alive connection: the client's next request on it
fails. `InternalErrorMiddleware` ends such a request with a 500 in the OpenAI shape instead, and the
connection stays usable.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.responses import JSONResponse

from .protocol import error_body

log = logging.getLogger("server.api")

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to echo and log


class RequestIdMiddleware:
    """Puts the request id (the client's X-Request-Id, or a new one) in scope state and the response headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class InternalErrorMiddleware:
    """An exception before the response started becomes a logged, clean 500 (``on_error(path)`` counts
    it); after it started (a stream), the exception goes on to the server, which closes the connection,
    since a cut-off body must not look complete."""

    def __init__(self, app, on_error=None):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            if self.on_error is not None:
                self.on_error(scope.get("path", ""))
            await JSONResponse(error_body("internal server error", "internal_error"), status_code=500)(scope, receive, send)
