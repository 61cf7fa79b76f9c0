"""Gates in front of the app, as pure ASGI middleware (streams pass through untouched): API keys and the
request-body limit. `create_app(engine, api_keys=[...], max_request_bytes=...)` installs them.

API keys. With keys configured, every path except the open ones needs ``Authorization: Bearer <key>``
(default deny: /v1/*, /tokenize, /detokenize, unknown paths). Open: /health, the API docs (/docs,
/redoc, /openapi.json), /metrics unless `metrics_require_key`, and what the app adds (the
playground's page and static files: it loads without a key and sends the one its user types). The key is compared with
hmac.compare_digest against every configured key, without stopping at a match, so the time taken does
not tell how much of a guess was right. A miss is 401 in the OpenAI error shape with
``WWW-Authenticate: Bearer``; neither the configured keys nor the key sent are ever logged or echoed.

Body limit. A request whose Content-Length, or whose streamed (chunked) body, exceeds the limit gets
413 before the app parses anything; the app sees the buffered body as usual.
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path

from starlette.responses import JSONResponse

from .protocol import error_body

log = logging.getLogger("server.api.security")

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what an HTTP header carries intact


def check_key(key: str, source: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"{source}: an API key must be printable ASCII without spaces (the key itself is not shown)")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot be read ({type(e).__name__})") from None
    keys = [check_key(line.strip(), f"--api-key-file {path}, line {i + 1}")
            for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: holds no key")
    return keys


class ApiKeyMiddleware:
    def __init__(self, app, keys, metrics_require_key: bool = False, on_reject=None, open_paths=(), open_prefixes=()):
        self.app = app
        self.keys = [k.encode("ascii") for k in keys]
        self.open_paths = (OPEN_PATHS if metrics_require_key else OPEN_PATHS | {"/metrics"}) | set(open_paths)
        self.open_prefixes = tuple(open_prefixes)
        self.on_reject = on_reject  # on_reject(path, status): counts rejections in the metrics

    def authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.strip().partition(b" ")
        token = token.strip()
        match = False
        for key in self.keys:  # every key, no early exit
            match |= hmac.compare_digest(token, key)
        return match and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.open_paths or path.startswith(self.open_prefixes) or self.authorized(scope):
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject(scope["path"], 401)
        body = error_body("missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                          "invalid_request_error", None, "invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def reject(self, scope, receive, send, status: int, message: str):
        if self.on_reject is not None:
            self.on_reject(scope["path"], status)
        code = "request_too_large" if status == 413 else None
        await JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than {self.max_bytes} bytes (--max-request-bytes)"
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.strip().isdigit():
                return await self.reject(scope, receive, send, 400, "the Content-Length header is not a number")
            if int(length) > self.max_bytes:
                return await self.reject(scope, receive, send, 413, too_large)
        # Read the body here (bounded), then hand it to the app as one message; later receive() calls
        # (the app watching for a disconnect) go to the server as before.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.reject(scope, receive, send, 413, too_large)
            if not message.get("more_body", False):
                break
        if len(messages) > 1 and all(m["type"] == "http.request" for m in messages):
            messages = [{"type": "http.request", "body": b"".join(m.get("body", b"") for m in messages), "more_body": False}]

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
