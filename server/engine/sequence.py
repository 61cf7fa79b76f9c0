"""Request state: one `Sequence` per generated choice, and what a step reports for it."""

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
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed): no K/V blocks
    RUNNING = "running"  # holds K/V blocks; prefilling in chunks, then decoding
    FINISHED = "finished"


# exit_threshold's default per criterion. "change": the relative change of h; on the default model the
# median is 0.19 after iteration 1, 0.057 after 2 and 0.032 after 3 (held-out text), so 0.05 stops about
# half the tokens after two iterations. "confidence": the largest next-token probability. "kl": the KL
# between successive iterations' next-token distributions (Huginn's criterion, and its threshold).
EXIT_CRITERIA = {"change": 0.05, "confidence": 0.9, "kl": 5e-4}


@dataclass(frozen=True)
class AutoDepth:
    """`loops: "auto"`: each generated token stops its recursion after iteration t (min_loops <= t <=
    max_loops) once its criterion says the state has converged:
    - "change" (default): ||h^(t) - h^(t-1)|| / ||h^(t-1)|| < exit_threshold (a norm: no extra layers);
    - "confidence": the depth-t next-token distribution's largest probability >= exit_threshold;
    - "kl": KL(p^(t) || p^(t-1)) < exit_threshold between the depth-t and depth-(t-1) distributions (t >= 2).
    The last two run the coda and the head after each iteration they check (the exit iteration's output is
    the token's, so the exit costs no extra coda). Prompts run at max_loops; max_loops None means the
    model's; exit_threshold None means EXIT_CRITERIA[exit_criterion]."""

    min_loops: int = 1
    max_loops: int | None = None
    exit_threshold: float | None = None
    exit_criterion: str = "change"

    @property
    def threshold(self) -> float:
        return EXIT_CRITERIA.get(self.exit_criterion, 0.0) if self.exit_threshold is None else self.exit_threshold


class Sequence:
    """One prompt being continued at one depth. The engine thread owns it; outputs carry copies.

    ``token_ids`` is prompt + generated tokens; ``num_computed`` of them have K/V in the pool, so the
    next step computes ``token_ids[num_computed:]`` (a prompt chunk, a recompute after preemption, or the
    one token sampled last). ``blocks[i]`` are the K/V blocks of tier i (model.tiers(config, loops)),
    one per ``block_size`` tokens, and ``table`` their unit ids by paged slot: (slots, max blocks).
    """

    __slots__ = (
        "id", "request_id", "index", "prompt_ids", "token_ids", "params", "loops", "generator", "sink",
        "output_ids", "num_computed", "status", "finish_reason", "detok", "prompt_logprobs", "leader",
        "blocks", "block_hashes", "num_committed", "table", "num_preemptions", "arrival", "admitted_at", "first_token_at",
        "last_token_at", "auto", "last_exit", "spec_tokens", "draft_ids", "draft_states", "draft_probs", "loop_steps", "num_drafted", "num_accepted", "num_spec_emitted",
    )

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loops: int, *, request_id: str = "",
                 index: int = 0, generator: torch.Generator | None = None, sink=None, detok: Detokenizer | None = None,
                 leader: "Sequence | None" = None, auto: AutoDepth | None = None):
        self.id = next(_ids)
        self.request_id, self.index = request_id, index
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params, self.loops, self.generator = params, loops, generator
        self.sink = sink  # where outputs go (a RequestHandle), or None for the synchronous API
        self.output_ids: list[int] = []
        self.num_computed = 0
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.detok = detok
        self.prompt_logprobs: list | None = None  # [None, (logprob, [(id, logprob), ...]), ...] when asked
        self.leader = leader  # n > 1: choice 0, whose prompt blocks the other choices share
        self.auto = auto  # adaptive depth (then `loops` is its max_loops: the tiers it may fill)
        self.last_exit = loops  # core iterations the last computed token ran (auto rows may stop early)
        self.blocks: list[list] = []
        self.block_hashes: list[int] = []  # chain hash of each full block of token_ids
        self.num_committed = 0  # leading blocks offered to the prefix cache
        self.table: torch.Tensor | None = None
        self.num_preemptions = 0
        # Self-speculation (engine.py): this round drafts `spec_tokens` tokens at a shallower depth; the
        # drafts and each draft input's recurrence state after the draft depth wait here for the verify pass.
        self.spec_tokens = 0
        self.draft_ids: list[int] = []
        self.draft_states: list[dict] = []
        self.draft_probs: list = []  # sampled rows: the distribution each draft was drawn from (V,)
        self.loop_steps = 0  # core iterations computed for generated tokens, rejected drafts included
        self.num_drafted = self.num_accepted = 0  # drafts made, drafts accepted
        self.num_spec_emitted = 0  # tokens that verify passes produced (accepted drafts and corrections)
        self.arrival = time.perf_counter()
        self.admitted_at = self.first_token_at = self.last_token_at = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_len(self) -> int:
        """Tokens this sequence may ever hold."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not computed yet: every prompt position must run (no cache hits)."""
        return self.params.prompt_logprobs and (self.prompt_logprobs is None or len(self.prompt_logprobs) < len(self.prompt_ids))

    @property
    def verifying(self) -> bool:
        """The drafts of this round are all in: the next step verifies them."""
        return self.spec_tokens > 0 and len(self.draft_ids) == self.spec_tokens

    def next_input(self) -> tuple[int, int]:
        """(token, position) of a one-token step: the last verified token, or the last draft."""
        if self.draft_ids:
            return self.draft_ids[-1], self.num_computed + len(self.draft_ids)
        return self.token_ids[self.num_computed], self.num_computed

    def end_round(self) -> None:
        self.spec_tokens = 0
        self.draft_ids, self.draft_states, self.draft_probs = [], [], []

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_ids.append(token)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, loops={self.loops}, {self.status.value}, {self.num_computed}/{self.num_tokens} "
                f"computed)")


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
