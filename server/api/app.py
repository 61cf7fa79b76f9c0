"""FastAPI app: OpenAI-compatible completions (+ SSE streaming) with per-request `loops`, and the
operational endpoints (/v1/models, /health, /metrics, /tokenize, /detokenize).

    app = create_app(engine)          # the lifespan starts the engine thread and stops it
    uvicorn.run(app, host=..., port=...)

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; FastAPI's 422 validation
errors become 400 with the offending field in `param`, as vLLM does. Every response carries
X-Request-Id (the client's, or a new one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, EngineDead, QueueFull, RequestError
from ..engine.metrics import CONTENT_TYPE_LATEST
from .protocol import (
    CompletionRequest,
    DetokenizeRequest,
    LogprobsBuilder,
    TokenizeRequest,
    completion_id,
    error_body,
    now,
    usage,
)
from ..engine.sampler import SamplingParams
from .security import ApiKeyMiddleware, BodyLimitMiddleware

log = logging.getLogger("server.api.app")

COMPLETIONS = "/v1/completions"
RETRY_AFTER_S = 1
MAX_REQUEST_BYTES = 4 * 2**20  # default request-body limit (--max-request-bytes)
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to echo and log


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class RequestIdMiddleware:
    """Pure ASGI (streams pass through untouched): puts the request id in scope state and the response headers."""

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


def create_app(engine: Engine, stop_engine_on_shutdown: bool = True, *, api_keys: Sequence[str] = (),
               metrics_require_key: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
               request_timeout: float | None = None) -> FastAPI:
    """`api_keys`: Bearer keys required on every path but /health, the docs and (unless
    `metrics_require_key`) /metrics (security.py). `request_timeout`: seconds from arrival after which a
    completion is aborted with 408 (or an error event in a stream); None = no limit. While
    `app.state.draining` is set (SIGTERM, see __main__), /health and new completions answer 503."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if stop_engine_on_shutdown:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mesh-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions for MeSH recursive transformers, with per-request `loops`.")
    app.state.engine = engine
    app.state.draining = False
    metrics = engine.metrics

    def count_rejected(path: str, status: int) -> None:  # rejections by the middleware below
        if metrics is not None and path == COMPLETIONS:
            metrics.requests.labels(status=str(status), finish_reason="").inc()

    # Outermost last: request id, then the key check (before any body is read), then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes, on_reject=count_rejected)
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=list(api_keys), metrics_require_key=metrics_require_key,
                           on_reject=count_rejected)
    app.add_middleware(RequestIdMiddleware)
    cfg = engine.model.config

    def count(status: int, finish_reason: str = "") -> None:
        if metrics is not None:
            metrics.requests.labels(status=str(status), finish_reason=finish_reason).inc()

    def error_response(request: Request, e: ApiError) -> JSONResponse:
        if request.url.path == COMPLETIONS:
            count(e.status)
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    # ---- errors -------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field '{param}': it is not part of this API"
        elif err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif err.get("type") == "value_error":  # our own validators: the message names the field already
            msg = str(err.get("msg")).removeprefix("Value error, ")
        else:
            msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return error_response(request, ApiError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(request, ApiError(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, ApiError(500, "internal server error", "internal_error"))

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise ApiError(404, f"The model '{name}' does not exist (this server serves '{engine.model_name}')",
                           "not_found_error", "model", "model_not_found")

    # ---- operational endpoints ----------------------------------------------------------------
    def model_card() -> dict:
        return {
            "id": engine.model_name, "object": "model", "created": now(), "owned_by": "mesh-serve",
            "root": str(engine.model_path) if engine.model_path else None,
            "max_model_len": engine.max_model_len, "max_loops": cfg.max_loops, "default_loops": cfg.default_loops,
            "layout": cfg.layout, "scheme": cfg.scheme,
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

    # ---- completions --------------------------------------------------------------------------
    @app.post(COMPLETIONS)
    async def completions(req: CompletionRequest, request: Request):
        if app.state.draining:  # new connections are refused by then; this covers kept-alive ones
            raise ApiError(503, "the server is shutting down; retry on another replica", "service_unavailable",
                           code="shutting_down")
        check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        prompts, texts = prompts_of(req)
        try:
            params = SamplingParams(
                max_tokens=16 if req.max_tokens is None else req.max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0, seed=req.seed,
                stop=tuple([req.stop] if isinstance(req.stop, str) else (req.stop or [])),
                logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None, ignore_eos=req.ignore_eos,
            )
            handle = engine.submit(prompts, params, req.loops, req.n, request.state.request_id)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDead as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        if metrics is not None:
            metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        if request_timeout:
            handle.deadline = time.monotonic() + request_timeout
        ctx = _Context(engine, req, prompts, texts, handle)
        ctx.timeout = request_timeout
        if req.stream:
            return StreamingResponse(stream(ctx, count), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await complete(ctx, request, count)

    def prompts_of(req: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        p = req.prompt
        if isinstance(p, str):
            items = [p]
        elif not p:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        prompts = [engine.encode(x) if isinstance(x, str) else list(x) for x in items]
        return prompts, [x if isinstance(x, str) else None for x in items]

    return app


class _Context:
    """One completion request on its way out: builds choices and chunks from the engine's StepOutputs."""

    def __init__(self, engine: Engine, req: CompletionRequest, prompts, texts, handle):
        self.engine, self.req, self.prompts, self.handle = engine, req, prompts, handle
        self.id, self.created = completion_id(), now()
        self.n = req.n
        self.timeout: float | None = None  # --request-timeout, for the error message
        self.loops = handle.seqs[0].loops
        # echo: the prompt text exactly as sent, or decoded when given as token ids
        self.prompt_texts = [t if t is not None else engine.decode(p) for t, p in zip(texts, prompts)]
        self.want_lp = req.logprobs is not None
        self._token_text: dict[int, str] = {}
        self.lp = {s.index: LogprobsBuilder(self.token_text) for s in handle.seqs} if self.want_lp else {}

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.engine.decode([token_id])
        return t

    def echo_prefix(self, seq) -> str:
        """The prompt part of a choice when `echo` is set (and its logprobs)."""
        prompt = self.prompts[seq.index // self.n]
        if self.want_lp:
            lps = seq.prompt_logprobs or [None] * len(prompt)
            for tok, entry in zip(prompt, lps):
                self.lp[seq.index].add(tok, entry)
        return self.prompt_texts[seq.index // self.n]

    def add_logprobs(self, out) -> None:
        if self.want_lp and out.logprobs:
            for tok, entry in zip(out.token_ids, out.logprobs):
                self.lp[out.seq.index].add(tok, entry)

    def usage(self) -> dict:
        return usage(sum(len(p) for p in self.prompts), sum(len(s.output_ids) for s in self.handle.seqs))

    def base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.engine.model_name}


def _finish_label(reasons: list[str]) -> str:
    return "length" if "length" in reasons else (reasons[0] if reasons else "")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(ctx: _Context, request: Request, count) -> JSONResponse | Response:
    """Non-streaming: gathers every choice; a client that disconnects first aborts the request."""
    texts = {s.index: [] for s in ctx.handle.seqs}
    reasons: dict[int, str] = {}
    error = None

    async def consume():
        nonlocal error
        async for out in ctx.handle:
            if out.seq.index not in reasons and not texts[out.seq.index] and ctx.req.echo:
                texts[out.seq.index].append(ctx.echo_prefix(out.seq))
            texts[out.seq.index].append(out.text)
            ctx.add_logprobs(out)
            if out.finished:
                reasons[out.seq.index] = out.finish_reason
                error = error or out.error

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not consumer.done():
            consumer.cancel()
            ctx.handle.abort()
        watcher.cancel()
    if not consumer.done() or consumer.cancelled():
        count(499, "abort")  # the client left: nobody reads this response
        return Response(status_code=499)
    if isinstance(consumer.exception(), asyncio.TimeoutError):
        ctx.handle.abort()
        count(408)
        return JSONResponse(_timeout_body(ctx), status_code=408)
    consumer.result()
    if error is not None:
        count(500)
        return JSONResponse(error_body(f"generation failed: {error}", "internal_error"), status_code=500)
    choices = [
        {"index": i, "text": "".join(texts[i]), "logprobs": ctx.lp[i].take() if ctx.want_lp else None,
         "finish_reason": reasons[i]}
        for i in sorted(texts)
    ]
    count(200, _finish_label([c["finish_reason"] for c in choices]))
    return JSONResponse({**ctx.base(), "choices": choices, "usage": ctx.usage(), "loops": ctx.loops})


def _timeout_body(ctx: _Context) -> dict:
    return error_body(f"the request did not finish within {ctx.timeout:g} s (the server's --request-timeout); "
                      "ask for fewer tokens or retry later", "timeout_error", None, "request_timeout")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(ctx: _Context, count):
    """SSE: one chunk per new text (or logprobs) per choice, the finish reason on each choice's last
    chunk, then a usage chunk when asked, then [DONE]. Cancelled (client gone) -> the request is aborted."""
    include_usage = bool(ctx.req.stream_options and ctx.req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    reasons: list[str] = []
    status = 499  # until the stream ends normally (200) or with an error event (500, 408)
    try:
        if ctx.req.echo:
            for seq in ctx.handle.seqs:
                text = ctx.echo_prefix(seq)
                lp = ctx.lp[seq.index].take() if ctx.want_lp else None
                yield _sse({**ctx.base(), "choices": [{"index": seq.index, "text": text, "logprobs": lp,
                                                       "finish_reason": None}], "loops": ctx.loops, **extra})
        try:
            async for out in ctx.handle:
                if out.error is not None:
                    status = 500
                    yield _sse(error_body(f"generation failed: {out.error}", "internal_error"))
                    break
                ctx.add_logprobs(out)
                if not out.text and not out.finished and not (ctx.want_lp and out.logprobs):
                    continue  # nothing new to show yet (an unfinished character, or a held-back stop prefix)
                if out.finished:
                    reasons.append(out.finish_reason)
                lp = ctx.lp[out.seq.index].take() if ctx.want_lp else None
                yield _sse({**ctx.base(), "choices": [{"index": out.seq.index, "text": out.text, "logprobs": lp,
                                                       "finish_reason": out.finish_reason}], "loops": ctx.loops, **extra})
            else:
                status = 200
                if include_usage:
                    yield _sse({**ctx.base(), "choices": [], "usage": ctx.usage(), "loops": ctx.loops})
        except asyncio.TimeoutError:  # --request-timeout: an error event, then [DONE]; `finally` aborts
            status = 408
            yield _sse(_timeout_body(ctx))
        yield "data: [DONE]\n\n"
    finally:
        ctx.handle.abort()  # no-op when every choice finished
        count(status, {200: _finish_label(reasons), 499: "abort"}.get(status, ""))
