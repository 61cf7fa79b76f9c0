"""Runs the model for one scheduled step: builds ids, positions and block tables, calls the model's
stages through the paged cache, and returns the logits the step samples from.

A step's rows are decode rows (one token: the one sampled last, the last token of a prompt, or a
draft token of a speculation round, at the draft depth), prompt chunks (several tokens of one
sequence), or verify passes (a round's drafts resumed from their saved recurrence states). Decode rows run together as one (n, 1) batch,
sorted deepest first so core iteration t runs only the rows with loops > t; each chunk runs as its
own (1, T) forward. A step's token budget bounds the chunks, so a long prompt never stalls the
running streams for long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import MeshForCausalLM

from .kv_cache import PagedKVCache
from .sequence import Sequence


@dataclass
class RunOutput:
    """`logits[i]` is the next-token distribution of `seqs[i]` (rows that computed their last known
    token, or a draft token); `verify[seq]` the depth-K logits (g, V) of a verify pass;
    `prompt_logits[seq] = (start, logits (T, V))` for chunks of prompts that want logprobs."""

    seqs: list[Sequence] = field(default_factory=list)
    logits: torch.Tensor | None = None
    verify: dict = field(default_factory=dict)
    prompt_logits: dict = field(default_factory=dict)

    @staticmethod
    def merge(parts: list["RunOutput"]) -> "RunOutput":
        out = RunOutput()
        for part in parts:
            out.seqs += part.seqs
            out.verify.update(part.verify)
            out.prompt_logits.update(part.prompt_logits)
        logits = [p.logits for p in parts if p.logits is not None]
        out.logits = torch.cat(logits) if logits else None
        return out


class ModelRunner:
    def __init__(self, model: MeshForCausalLM, kv: PagedKVCache, draft_loops: int = 0):
        self.model, self.kv = model, kv
        self.device = kv.kv.device
        self.draft_loops = draft_loops  # the depth speculation drafts at (0: off)

    @torch.inference_mode()
    def run(self, rows: list[tuple[Sequence, int]]) -> RunOutput:
        """rows: (sequence, tokens this step computes). K/V of those tokens land in the pool; the caller
        advances num_computed. A sequence in a speculation round runs one draft token at the draft depth
        (its recurrence state after that depth is kept), or the verify pass over its drafts."""
        out = RunOutput()
        decode = sorted((s for s, n in rows if self.is_decode(s, n)), key=lambda s: -self.depth(s))
        parts = []
        if decode:
            parts.append(self.decode(decode))
            out.seqs += decode
        for seq, n in rows:
            if seq.verifying:
                out.verify[seq] = self.verify(seq)
            elif not self.is_decode(seq, n):
                last, prompt = self.chunk(seq, n)
                if last is not None:
                    parts.append(last)
                    out.seqs.append(seq)
                if prompt is not None:
                    out.prompt_logits[seq] = (seq.num_computed, prompt)
        if parts:
            out.logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out

    @staticmethod
    def is_decode(seq: Sequence, n: int) -> bool:
        """A one-token row that samples next: a draft, or the sequence's last known token (a one-token
        piece of a prompt is a chunk: it must not sample)."""
        if seq.spec_tokens:
            return not seq.verifying
        return n == 1 and seq.num_computed + 1 == seq.num_tokens and not seq.wants_prompt_logprobs

    def depth(self, seq: Sequence) -> int:
        """Core iterations of a one-token step: the draft depth in a speculation round, else the request's."""
        return self.draft_loops if seq.spec_tokens else seq.loops

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, loops: int, row_loops, keep_all: bool):
        """-> (logits (T, V) or (B, V), the recurrence state after each row's last iteration)."""
        m = self.model
        ctx = m.layer_context(positions, cache=self.kv, loops=loops, row_loops=row_loops)
        state = m.iterate(m.start(m.embed(ids), ctx), 0, loops, ctx)
        h = m.finish(state, ctx)  # (B, T, D)
        return m.compute_logits(h[0] if keep_all else h[:, -1]), state

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row (`seqs` deepest first) -> logits (n, V). Draft rows keep their state."""
        n, bs = len(seqs), self.kv.block_size
        inputs = [s.next_input() for s in seqs]
        ids = torch.tensor([t for t, _ in inputs], device=self.device).view(n, 1)
        positions = [p for _, p in inputs]
        pos = torch.tensor(positions, device=self.device)
        nb = max(positions) // bs + 1
        self.kv.begin_decode(torch.stack([s.table[:, :nb] for s in seqs]).to(self.device), pos)
        depths = [self.depth(s) for s in seqs]
        row_loops = None if depths[0] == depths[-1] else depths
        logits, state = self._forward(ids, pos.view(n, 1), depths[0], row_loops, keep_all=False)
        for i, seq in enumerate(seqs):
            if seq.spec_tokens:  # the draft input's state after the draft depth: where verify resumes
                seq.draft_states.append({name: v[i : i + 1].clone() for name, v in state.items()})
        return logits

    def verify(self, seq: Sequence) -> torch.Tensor:
        """Resumes the round's draft inputs from their saved states: core iterations draft_loops .. K-1 and
        the coda at depth K, for positions num_computed .. + spec_tokens - 1 -> depth-K logits (g, V).
        Their prelude and shallow iterations were computed by the drafts and are not run again."""
        start, g = seq.num_computed, seq.spec_tokens
        state = {name: torch.cat([st[name] for st in seq.draft_states], dim=1) for name in seq.draft_states[0]}  # (1, g, ...)
        self.kv.begin_chunk(seq.table.to(self.device), start, g)
        m = self.model
        ctx = m.layer_context(torch.arange(start, start + g, device=self.device)[None], cache=self.kv, loops=seq.loops)
        state = m.iterate(state, self.draft_loops, seq.loops, ctx)
        return m.compute_logits(m.finish(state, ctx)[0])

    def chunk(self, seq: Sequence, T: int):
        """T tokens of one sequence from its num_computed on -> (last-position logits (1, V) when this
        chunk reaches the sequence's last known token, else None; the chunk's logits (T, V) when the
        prompt's logprobs are wanted, else None)."""
        start = seq.num_computed
        ids = torch.tensor([seq.token_ids[start : start + T]], device=self.device)
        self.kv.begin_chunk(seq.table.to(self.device), start, T)
        pos = torch.arange(start, start + T, device=self.device)[None]
        want_prompt = seq.wants_prompt_logprobs
        logits, _ = self._forward(ids, pos, seq.loops, None, keep_all=want_prompt)
        done = start + T == seq.num_tokens
        if want_prompt:
            return (logits[-1:] if done else None), logits
        return (logits if done else None), None
