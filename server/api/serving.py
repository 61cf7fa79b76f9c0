"""Request -> engine -> response or stream, one code path for /v1/completions and /v1/chat/completions.

    serving = Serving(engine, count, request_timeout)
    await serving.completions(req, request)     # or serving.chat(req, request): a JSON or SSE response

Both endpoints build their prompts, one `SamplingParams` and submit to the engine the same way; they
differ only in the output shape (`CompletionShape`, `ChatShape`: how a choice, a stream chunk and
logprobs are written). A chat prompt comes from the tokenizer's `chat_template`; a model without one
gets `PLAIN_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import AutoDepth, EngineDead, QueueFull, RequestError
from ..engine.sampler import SamplingParams
from .protocol import (ChatCompletionRequest, ChatLogprobsBuilder, CompletionRequest, LogprobsBuilder, error_body,
                       new_id, now, usage)

RETRY_AFTER_S = 1
# A base model has no chat template: each message becomes "Role: text" on its own line (a system
# message is the first line as it is), and the prompt ends with "Assistant:" for the model to go on.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n"
                       "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}{% endfor %}Assistant:")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class CompletionShape:
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"
    logprobs = LogprobsBuilder

    @staticmethod
    def choice(index: int, text: str, logprobs, reason) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    chunk = choice


class ChatShape:
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"
    logprobs = ChatLogprobsBuilder

    @staticmethod
    def choice(index: int, text: str, logprobs, reason) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason}

    @staticmethod
    def chunk(index: int, text: str, logprobs, reason, role: bool = False) -> dict:
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if text or reason is None else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def chat_prompt(tokenizer, messages) -> tuple[str, bool]:
    """The prompt text of a conversation, and whether the tokenizer should add its special tokens (a
    model's own template writes the ones it wants)."""
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    template = getattr(tokenizer, "chat_template", None)
    try:
        text = tokenizer.apply_chat_template(convo, chat_template=template or PLAIN_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as e:  # the model's template refuses this conversation (raise_exception)
        raise ApiError(400, f"the model's chat template refuses these messages: {e}", param="messages") from None
    return text, not template


def sampling_params(kwargs: dict, vocab_size: int) -> SamplingParams:
    """SamplingParams from a request's fields; its ValueError (whose message starts with the field's
    name) becomes a 400 naming that field."""
    bad = next((t for t in kwargs.get("logit_bias", {}) if t >= vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab_size})", param="logit_bias")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        raise ApiError(400, str(e), param=name if name in names else None) from None


class Job:
    """One request on its way out: the engine handle, and what its choices and chunks are built from."""

    def __init__(self, engine, shape, handle, prompts: list[list[int]], prompt_texts: list[str], *, want_lp: bool,
                 echo: bool = False, stream_options=None, timeout: float | None = None):
        self.engine, self.shape, self.handle, self.prompts = engine, shape, handle, prompts
        self.prompt_texts, self.want_lp, self.echo, self.timeout = prompt_texts, want_lp, echo, timeout
        self.id, self.created = new_id(shape.id_prefix), now()
        self.n = len(handle.seqs) // len(prompts)
        self.loops = "auto" if handle.seqs[0].auto else handle.seqs[0].loops
        opts = stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.continuous_usage_stats)
        self.generated = 0  # tokens received so far (continuous usage)
        self._token_text: dict[int, str] = {}
        self.lp = {s.index: shape.logprobs(self.token_text) for s in handle.seqs} if want_lp else {}

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.engine.decode([token_id])
        return t

    def echo_prefix(self, seq) -> str:
        """The prompt part of a completion choice when `echo` is set (and its logprobs)."""
        prompt = self.prompts[seq.index // self.n]
        if self.want_lp:
            for tok, entry in zip(prompt, seq.prompt_logprobs or [None] * len(prompt)):
                self.lp[seq.index].add(tok, entry)
        return self.prompt_texts[seq.index // self.n]

    def add(self, out) -> None:
        self.generated += len(out.token_ids)
        if self.want_lp and out.logprobs:
            for tok, entry in zip(out.token_ids, out.logprobs):
                self.lp[out.seq.index].add(tok, entry)

    def take_logprobs(self, index: int):
        return self.lp[index].take() if self.want_lp else None

    def usage(self, final: bool = True) -> dict:
        done = sum(len(s.output_ids) for s in self.handle.seqs) if final else self.generated
        # loop_steps (an extension): core iterations the generated tokens cost, rejected drafts included
        return {**usage(sum(len(p) for p in self.prompts), done), "loop_steps": sum(s.loop_steps for s in self.handle.seqs)}

    def chunk(self, choices: list[dict]) -> str:
        extra = {"usage": self.usage(final=False)} if self.continuous_usage else ({"usage": None} if self.include_usage else {})
        return _sse({**self.base(self.shape.chunk_object), "choices": choices, "loops": self.loops, **extra})

    def base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.engine.model_name}


class Serving:
    """The two generation endpoints over one engine. ``count(status, finish_reason)`` feeds the
    request metrics; ``request_timeout``: seconds after which a request is aborted (None: no limit)."""

    def __init__(self, engine, count, request_timeout: float | None = None):
        self.engine, self.count, self.timeout = engine, count, request_timeout

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check(req, request)
        items = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else list(req.prompt)
        if not items:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        prompts = [self.engine.encode(x) if isinstance(x, str) else list(x) for x in items]
        # echo: the prompt text exactly as sent, or decoded when given as token ids
        texts = [x if isinstance(x, str) else self.engine.decode(x) for x in items]
        kw = req.sampling_kwargs() | _given(max_tokens=req.max_tokens, logprobs=req.logprobs)
        kw["prompt_logprobs"] = req.echo and req.logprobs is not None
        params = sampling_params(kw, self.engine.vocab_size)
        return await self._run(req, request, CompletionShape, prompts, texts, params, echo=req.echo)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check(req, request)
        text, special = chat_prompt(self.engine.tokenizer, req.messages)
        prompts = [self.engine.encode(text, add_special_tokens=special)]
        kw = req.sampling_kwargs() | _given(max_tokens=req.max_completion_tokens or req.max_tokens,
                                            logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        params = sampling_params(kw, self.engine.vocab_size)
        return await self._run(req, request, ChatShape, prompts, [text], params)

    def _check(self, req, request: Request) -> None:
        if request.app.state.draining:  # new connections are refused by then; this covers kept-alive ones
            raise ApiError(503, "the server is shutting down; retry on another replica", "service_unavailable",
                           code="shutting_down")
        if req.model is not None and req.model != self.engine.model_name:
            raise model_not_found(req.model, self.engine.model_name)

    @staticmethod
    def _depth(req):
        """The engine's `loops`: an int, None (the model's default) or, for "auto", an AutoDepth."""
        names = ("min_loops", "max_loops", "exit_criterion", "exit_threshold")
        auto = {name: getattr(req, name) for name in names if getattr(req, name) is not None}
        if req.loops != "auto":
            if auto:
                name = next(iter(auto))
                raise ApiError(400, f'{name} is only used with loops "auto"', param=name)
            return req.loops
        return AutoDepth(**auto)

    async def _run(self, req, request: Request, shape, prompts, texts, params: SamplingParams, echo: bool = False):
        try:
            handle = self.engine.submit(prompts, params, self._depth(req), req.n, request.state.request_id)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDead as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        if self.engine.metrics is not None:
            self.engine.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        if self.timeout:
            handle.deadline = time.monotonic() + self.timeout
        job = Job(self.engine, shape, handle, prompts, texts, want_lp=params.logprobs is not None, echo=echo,
                  stream_options=req.stream_options, timeout=self.timeout)
        if req.stream:
            return StreamingResponse(stream(job, self.count), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await complete(job, request, self.count)


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist (this server serves '{served}')", "not_found_error",
                    "model", "model_not_found")


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _finish_label(reasons: list[str]) -> str:
    return "length" if "length" in reasons else (reasons[0] if reasons else "")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _gather(job: Job, texts: dict, reasons: dict) -> str | None:
    """Collects every choice's text and finish reason; returns the first engine error, if any."""
    error = None
    async for out in job.handle:
        i = out.seq.index
        if job.echo and i not in reasons and not texts[i]:
            texts[i].append(job.echo_prefix(out.seq))
        texts[i].append(out.text)
        job.add(out)
        if out.finished:
            reasons[i] = out.finish_reason
            error = error or out.error
    return error


async def complete(job: Job, request: Request, count) -> Response:
    """Non-streaming: gathers every choice; a client that disconnects first aborts the request."""
    texts = {s.index: [] for s in job.handle.seqs}
    reasons: dict[int, str] = {}
    consumer = asyncio.ensure_future(_gather(job, texts, reasons))
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not consumer.done():
            consumer.cancel()
            job.handle.abort()
        watcher.cancel()
    if not consumer.done() or consumer.cancelled():
        count(499, "abort")  # the client left: nobody reads this response
        return Response(status_code=499)
    if isinstance(consumer.exception(), asyncio.TimeoutError):
        job.handle.abort()
        count(408)
        return JSONResponse(_timeout_body(job), status_code=408)
    error = consumer.result()
    if error is not None:
        count(500)
        return JSONResponse(error_body(f"generation failed: {error}", "internal_error"), status_code=500)
    choices = [job.shape.choice(i, "".join(texts[i]), job.take_logprobs(i), reasons[i]) for i in sorted(texts)]
    count(200, _finish_label([c["finish_reason"] for c in choices]))
    return JSONResponse({**job.base(job.shape.object), "choices": choices, "usage": job.usage(), "loops": job.loops})


def _timeout_body(job: Job) -> dict:
    return error_body(f"the request did not finish within {job.timeout:g} s (the server's --request-timeout); "
                      "ask for fewer tokens or retry later", "timeout_error", None, "request_timeout")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _heads(job: Job):
    """A stream's opening chunks: chat's role chunk per choice, or the echoed prompt per completion choice."""
    for seq in job.handle.seqs:
        if job.shape is ChatShape:
            yield job.chunk([ChatShape.chunk(seq.index, "", None, None, role=True)])
        elif job.echo:
            text = job.echo_prefix(seq)
            yield job.chunk([CompletionShape.chunk(seq.index, text, job.take_logprobs(seq.index), None)])


async def stream(job: Job, count):
    """SSE: the opening chunks, one chunk per new text (or logprobs) per choice, the finish reason on
    each choice's last chunk, a usage chunk when asked, then [DONE]. Cancelled (client gone) -> the
    request is aborted."""
    reasons: list[str] = []
    status = 499  # until the stream ends normally (200) or with an error event (500, 408)
    try:
        for head in _heads(job):
            yield head
        try:
            async for out in job.handle:
                if out.error is not None:
                    status = 500
                    yield _sse(error_body(f"generation failed: {out.error}", "internal_error"))
                    break
                job.add(out)
                if not out.text and not out.finished and not (job.want_lp and out.logprobs):
                    continue  # nothing new to show yet (an unfinished character, or a held-back stop prefix)
                if out.finished:
                    reasons.append(out.finish_reason)
                yield job.chunk([job.shape.chunk(out.seq.index, out.text, job.take_logprobs(out.seq.index), out.finish_reason)])
            else:
                status = 200
                if job.include_usage:
                    yield _sse({**job.base(job.shape.chunk_object), "choices": [], "usage": job.usage(), "loops": job.loops})
        except asyncio.TimeoutError:  # --request-timeout: an error event, then [DONE]; `finally` aborts
            status = 408
            yield _sse(_timeout_body(job))
        yield "data: [DONE]\n\n"
    finally:
        job.handle.abort()  # no-op when every choice finished
        count(status, {200: _finish_label(reasons), 499: "abort"}.get(status, ""))
