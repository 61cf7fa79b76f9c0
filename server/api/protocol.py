"""The OpenAI-compatible wire format: request schemas (pydantic), response builders, the error shape.

Unknown fields are refused (400 naming the field), and OpenAI fields this server does not implement
(`suffix`, `best_of`, `logit_bias`, penalties) are accepted only at their no-op values: nothing a
client sends is silently ignored. Number and boolean fields are strict ("5" is not 5, true is not 1).
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from ..engine.sampler import MAX_LOGPROBS

MAX_N = 16  # choices per prompt
MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (a stream holds back that many characters)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


def _unsupported(name: str, hint: str = ""):
    return ValueError(f"'{name}' is not supported by this server{hint}")


class CompletionRequest(BaseModel):
    """POST /v1/completions. `loops` (recursion depth) and `top_k`, `ignore_eos` (as in vLLM) are extensions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    loops: StrictInt | None = Field(None, description="recursion depth of this request, 1..max_loops (default: the model's)")
    ignore_eos: StrictBool = False
    user: StrictStr | None = None  # informational (OpenAI); not used
    # OpenAI fields without an implementation here: only their no-op values pass.
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None

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

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise _unsupported("suffix", " (no fill-in-the-middle)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != 1 and v != info.data.get("n", 1):
            raise _unsupported("best_of", " (use n)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise _unsupported("logit_bias")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v, info):
        if v:
            raise _unsupported(info.field_name, " (only 0)")
        return v


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


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
