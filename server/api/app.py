"""FastAPI app, routes only: OpenAI-compatible completions and chat completions (+ SSE streaming) with
per-request `loops`, the operational endpoints (/v1/models, /health, /metrics, /tokenize, /detokenize)
and the browser playground at / (static files in static/; `ui=False` turns it off).

    app = create_app(engine)          # the lifespan starts the engine thread and stops it
    uvicorn.run(app, host=..., port=...)

Request -> engine -> response lives in serving.py. Errors use OpenAI's shape {"error": {"message",
"type", "param", "code"}}; FastAPI's 422 validation errors become 400 with the offending field's path
in `param` (`stream_options.foo`, `messages[0].content`), as vLLM does. Every response carries
X-Request-Id (the client's, or a new one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..engine.metrics import CONTENT_TYPE_LATEST
from .middleware import InternalErrorMiddleware, RequestIdMiddleware
from .protocol import REFUSED, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body, now
from .security import ApiKeyMiddleware, BodyLimitMiddleware
from .serving import ApiError, Serving, model_not_found

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GENERATE = (COMPLETIONS, CHAT)  # the paths whose requests the metrics count
MAX_REQUEST_BYTES = 4 * 2**20  # default request-body limit (--max-request-bytes)
STATIC = Path(__file__).parent / "static"
# The playground runs only its own files: no inline script, nothing from elsewhere.
PLAYGROUND_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def create_app(engine: Engine, stop_engine_on_shutdown: bool = True, *, api_keys: Sequence[str] = (),
               metrics_require_key: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
               request_timeout: float | None = None, ui: bool = True) -> FastAPI:
    """`api_keys`: Bearer keys required on every path but /health, the docs, the playground's files and
    (unless `metrics_require_key`) /metrics (security.py). `request_timeout`: seconds from arrival after
    which a request is aborted with 408 (or an error event in a stream); None = no limit. While
    `app.state.draining` is set (SIGTERM, see __main__), /health and new requests answer 503."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if stop_engine_on_shutdown:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mesh-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions for MeSH recursive transformers, with per-request `loops`.")
    app.state.engine, app.state.draining = engine, False
    count = _counter(engine.metrics)
    # Outermost last: request id, the last-resort 500, the key check (before any body is read), the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes, on_reject=lambda path, s: path in GENERATE and count(s))
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=list(api_keys), metrics_require_key=metrics_require_key,
                           on_reject=lambda path, s: path in GENERATE and count(s),
                           open_paths={"/"} if ui else (), open_prefixes=("/static/",) if ui else ())
    app.add_middleware(InternalErrorMiddleware, on_error=lambda path: path in GENERATE and count(500))
    app.add_middleware(RequestIdMiddleware)
    _error_handlers(app, count)
    _operational_routes(app, engine)
    serving = Serving(engine, count, request_timeout)

    @app.post(COMPLETIONS)
    async def completions(req: CompletionRequest, request: Request):
        return await serving.completions(req, request)

    @app.post(CHAT)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await serving.chat(req, request)

    if ui:
        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PLAYGROUND_CSP})

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _counter(metrics):
    def count(status: int, finish_reason: str = "") -> None:
        if metrics is not None:
            metrics.requests.labels(status=str(status), finish_reason=finish_reason).inc()
    return count


def field_path(loc, body, missing: bool = False) -> str | None:
    """The request field an error is about, as `a.b[0].c`: pydantic's `loc` walked through the body
    itself, so union-member tags ('list[str]', 'function-after[...]') drop out. `missing`: the last
    part names a field the body lacks."""
    path, node = "", body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and (part in node or (missing and i == len(loc) - 1)):
            safe = _escaped(part)  # a key may hold a lone surrogate
            path, node = (f"{path}.{safe}" if path else safe), node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
    return path or None


def _escaped(text: str) -> str:
    """Text safe to echo in a JSON response: lone surrogates as \\udXXX escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_message(err: dict, path: str | None) -> str:
    kind, msg = err.get("type"), str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    name = path.rsplit(".", 1)[-1] if path else ""
    if kind == "extra_forbidden":
        if name in REFUSED and "." not in path:
            return f"'{name}' is not supported by this server ({REFUSED[name]})"
        return f"unknown field '{path}': it is not part of this API"
    if path and not msg.startswith(path.split(".")[0].split("[")[0]):
        return f"{path}: {msg}"
    return msg


def _error_handlers(app: FastAPI, count) -> None:
    def respond(request: Request, e: ApiError) -> JSONResponse:
        if request.url.path in GENERATE:
            count(e.status)
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return respond(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors() or [{"loc": (), "msg": "invalid request"}]
        if errors[0].get("type") == "json_invalid":
            return respond(request, ApiError(400, "the request body is not valid JSON"))

        def path_of(err):
            loc = [x for x in err.get("loc", ()) if x != "body"]
            if isinstance(e.body, dict):
                return field_path(loc, e.body, err.get("type") == "missing")
            return loc[0] if loc and isinstance(loc[0], str) else None  # not an object: the field is missing

        # A union field fails once per member: report our own validators' errors first, then the deepest path.
        paths = [path_of(err) for err in errors]
        best = max(range(len(errors)), key=lambda i: (errors[i].get("type") == "value_error", len(paths[i] or "")))
        if paths[best] is None and errors[best].get("type") == "string_unicode":  # a field *name* with a lone surrogate
            name = _escaped(str(errors[best].get("input")))
            return respond(request, ApiError(400, f"unknown field '{name}': its name is not valid Unicode", param=name))
        return respond(request, ApiError(400, _validation_message(errors[best], paths[best]), param=paths[best]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return respond(request, ApiError(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None)))


def _operational_routes(app: FastAPI, engine: Engine) -> None:
    cfg, metrics = engine.model.config, engine.metrics

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise model_not_found(name, engine.model_name)

    def model_card() -> dict:
        return {
            "id": engine.model_name, "object": "model", "created": now(), "owned_by": "mesh-serve",
            "root": str(engine.model_path) if engine.model_path else None,
            "max_model_len": engine.max_model_len, "max_loops": cfg.max_loops, "default_loops": cfg.default_loops,
            "layout": cfg.layout, "scheme": cfg.scheme,
            "loops_auto": True,  # requests may send loops "auto" (adaptive depth); the playground offers it
        }

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse(error_body("the server is shutting down", "service_unavailable"), status_code=503)
        if engine.alive:
            return {"status": "ok"}
        return JSONResponse(error_body("the engine is not running", "service_unavailable"), status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            raise ApiError(404, "metrics are disabled", "not_found_error")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        ids = engine.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", param="tokens")
        return {"prompt": engine.decode(req.tokens)}
