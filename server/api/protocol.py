"""The OpenAI-compatible wire format: request schemas (pydantic), response builders, the error shape.

Unknown fields are refused (400 naming the field's path, e.g. `stream_options.foo`); OpenAI fields
this server does not implement are refused with the reason (`REFUSED`), or, for a few, accepted only
at their no-op values: nothing a client sends is silently ignored. Number and boolean fields are
strict ("5" is not 5, true is not 1). Every string must be valid Unicode: a lone surrogate (the
valid JSON "\\ud800") is a 400 naming the field, never a crash in the tokenizer.

Ranges of the sampling fields live in `SamplingParams` (server/engine/sampler.py), not here.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)

from ..engine.sampler import MAX_LOGPROBS

MAX_N = 16  # choices per prompt
MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (a stream holds back that many characters)

# OpenAI fields this server refuses, and why (a 400 names the field and says this). README lists them.
REFUSED = {
    "suffix": "no fill-in-the-middle",
    "best_of": "use n",
    "tools": "no tool calling",
    "tool_choice": "no tool calling",
    "parallel_tool_calls": "no tool calling",
    "functions": "no function calling",
    "function_call": "no function calling",
    "response_format": "no structured output (JSON mode, schemas)",
    "audio": "text only",
    "modalities": "text only",
    "prediction": "no predicted outputs",
    "store": "nothing is stored",
    "metadata": "nothing is stored",
    "reasoning_effort": "not a reasoning model",
    "service_tier": "one tier",
    "web_search_options": "no web search",
}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode at character {e.start} (a lone surrogate such as \\ud800)") from None
    return s


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]  # every string field of every request


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: StrictBool = False  # usage (so far) in every chunk, as vLLM does


class SamplingFields(_Request):
    """The fields both generation endpoints share. `loops` (recursion depth), and `top_k`, `min_tokens`,
    `repetition_penalty`, `ignore_eos` (as in vLLM) are extensions. Defaults: SamplingParams."""

    model: Text | None = None
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    loops: StrictInt | Literal["auto"] | None = Field(
        None, description='recursion depth of this request, 1..max_loops (default: the model\'s), or "auto": each '
                          "token stops its recursion once its state converges (min_loops, max_loops, exit_criterion, exit_threshold)")
    min_loops: StrictInt | None = None  # loops "auto" only: iterations every token runs (default 1)
    max_loops: StrictInt | None = None  # loops "auto" only: iterations no token exceeds (default the model's)
    exit_criterion: Literal["change", "confidence", "kl"] | None = None  # loops "auto" only (default "change")
    exit_threshold: StrictFloat | None = Field(None, ge=0.0)  # loops "auto" only: the criterion's threshold
    ignore_eos: StrictBool = False
    user: Text | None = None  # informational (OpenAI); not used
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    logit_bias: dict[Text, StrictFloat] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    min_tokens: StrictInt | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def sampling_kwargs(self) -> dict:
        """The SamplingParams fields this request sets (the rest keep SamplingParams' defaults)."""
        names = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens")
        kw = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if self.stop is not None:
            kw["stop"] = tuple([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.logit_bias:
            kw["logit_bias"] = {int(k): float(b) for k, b in self.logit_bias.items()}
        return kw


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    # OpenAI fields without an implementation here: only their no-op values pass.
    suffix: Text | None = None
    best_of: StrictInt | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise _refused("suffix")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != 1 and v != info.data.get("n", 1):
            raise _refused("best_of")
        return v


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                           description=f"at most {MAX_LOGPROBS} (this server's cap; OpenAI allows 20)")

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v, info):
        given = info.data.get("max_tokens")
        if v is not None and given is not None and v != given:
            raise ValueError("max_tokens and max_completion_tokens disagree: send one of them")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


def _refused(name: str) -> ValueError:
    return ValueError(f"'{name}' is not supported by this server ({REFUSED[name]})")


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[StrictInt]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class LogprobsBuilder:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (into the choice's text)."""

    def __init__(self, token_text, offset: int = 0):
        self.token_text = token_text  # id -> its text
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, entry) -> None:
        """entry: None (no logprob: the first prompt token) or (logprob, [(id, logprob), ...])."""
        text = self.token_text(token_id)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if entry is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        lp, top = entry
        self.token_logprobs.append(lp)
        tops: dict[str, float] = {}
        for i, v in top:  # most likely first: when two tokens decode to the same text, the likelier one shows
            tops.setdefault(self.token_text(i), v)
        tops[text] = lp  # the sampled token is always there (up to logprobs + 1 entries, as OpenAI)
        self.top_logprobs.append(tops)

    def take(self) -> dict:
        """The entries added since the last take (streams send each chunk's own)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


class ChatLogprobsBuilder:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def __init__(self, token_text):
        self.token_text = token_text
        self.content: list[dict] = []

    def entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def add(self, token_id: int, entry) -> None:
        lp, top = entry
        self.content.append({**self.entry(token_id, lp), "top_logprobs": [self.entry(i, v) for i, v in top]})

    def take(self) -> dict:
        out, self.content = {"content": self.content}, []
        return out
