"""Request state: one `Sequence` per generated choice, and what a scheduler step reports for it."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass

import torch

from .detokenizer import Detokenizer
from .sampler import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no KV memory yet
    RUNNING = "running"  # admitted: a row of the KV pool (prefilled in the step that admitted it)
    FINISHED = "finished"


class Sequence:
    """One prompt being continued at one depth. The engine thread owns it; outputs carry copies."""

    __slots__ = (
        "id", "request_id", "index", "prompt_ids", "params", "loops", "generator", "sink",
        "output_ids", "num_cached", "row", "status", "finish_reason", "detok", "prompt_logprobs",
        "arrival", "admitted_at", "first_token_at", "last_token_at",
    )

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loops: int, *, request_id: str = "",
                 index: int = 0, generator: torch.Generator | None = None, sink=None, detok: Detokenizer | None = None):
        self.id = next(_ids)
        self.request_id, self.index = request_id, index
        self.prompt_ids = list(prompt_ids)
        self.params, self.loops, self.generator = params, loops, generator
        self.sink = sink  # where outputs go (a RequestHandle), or None for the synchronous API
        self.output_ids: list[int] = []
        self.num_cached = 0  # tokens whose K/V are in the pool
        self.row = -1  # position in the running batch (the pool keeps it)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.detok = detok
        self.prompt_logprobs = None  # [(logprob, [(id, logprob), ...]) or None] per prompt token, when asked
        self.arrival = time.perf_counter()
        self.admitted_at = self.first_token_at = self.last_token_at = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens this sequence may ever hold: what admission reserves KV memory for."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, loops={self.loops}, row={self.row}, {self.status.value}, {self.num_tokens} tokens)"


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one sequence (plain data: safe to hand to another thread)."""

    seq: Sequence
    token_ids: list[int]  # new tokens (one per step)
    text: str  # new text ("" until a character is complete, or while a possible stop string is held back)
    logprobs: list | None  # per new token: (logprob, [(token_id, logprob), ...]) when asked
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last output
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
