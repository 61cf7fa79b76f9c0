"""Runs the model for one scheduled step: builds ids, positions and block tables, calls the model's
stages through the paged cache, and returns the logits the step samples from.

A step's rows are either decode rows (one token: the one sampled last, or the last token of a prompt)
or prompt chunks (several tokens of one sequence). Decode rows run together as one (n, 1) batch,
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
    token); `prompt_logits[seq] = (start, logits (T, V))` for chunks of prompts that want logprobs."""

    seqs: list[Sequence] = field(default_factory=list)
    logits: torch.Tensor | None = None
    prompt_logits: dict = field(default_factory=dict)

    @staticmethod
    def merge(parts: list["RunOutput"]) -> "RunOutput":
        out = RunOutput()
        for part in parts:
            out.seqs += part.seqs
            out.prompt_logits.update(part.prompt_logits)
        logits = [p.logits for p in parts if p.logits is not None]
        out.logits = torch.cat(logits) if logits else None
        return out


class ModelRunner:
    def __init__(self, model: MeshForCausalLM, kv: PagedKVCache):
        self.model, self.kv = model, kv
        self.device = kv.kv.device

    @torch.inference_mode()
    def run(self, rows: list[tuple[Sequence, int]]) -> RunOutput:
        """rows: (sequence, tokens to compute from its num_computed on). K/V of those tokens land in the
        pool; the caller advances num_computed."""
        out = RunOutput()
        decode = sorted((s for s, n in rows if n == 1), key=lambda s: -s.loops)
        parts = []
        if decode:
            parts.append(self.decode(decode))
            out.seqs += decode
        for seq, n in rows:
            if n > 1:
                last, prompt = self.chunk(seq, n)
                if last is not None:
                    parts.append(last)
                    out.seqs.append(seq)
                if prompt is not None:
                    out.prompt_logits[seq] = (seq.num_computed, prompt)
        if parts:
            out.logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, loops: int, row_loops, keep_all: bool) -> torch.Tensor:
        m = self.model
        ctx = m.layer_context(positions, cache=self.kv, loops=loops, row_loops=row_loops)
        state = m.iterate(m.start(m.embed(ids), ctx), 0, loops, ctx)
        h = m.finish(state, ctx)  # (B, T, D)
        return m.compute_logits(h[0] if keep_all else h[:, -1])  # (T, V) or (B, V)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row (`seqs` deepest first) -> logits (n, V)."""
        n, bs = len(seqs), self.kv.block_size
        ids = torch.tensor([s.token_ids[s.num_computed] for s in seqs], device=self.device).view(n, 1)
        computed = [s.num_computed for s in seqs]
        pos = torch.tensor(computed, device=self.device)
        nb = max(computed) // bs + 1
        self.kv.begin_decode(torch.stack([s.table[:, :nb] for s in seqs]).to(self.device), pos)
        row_loops = None if seqs[0].loops == seqs[-1].loops else [s.loops for s in seqs]
        return self._forward(ids, pos.view(n, 1), seqs[0].loops, row_loops, keep_all=False)

    def chunk(self, seq: Sequence, T: int):
        """T tokens of one sequence from its num_computed on -> (last-position logits (1, V) when this
        chunk reaches the sequence's last known token, else None; the chunk's logits (T, V) when the
        prompt's logprobs are wanted, else None)."""
        start = seq.num_computed
        ids = torch.tensor([seq.token_ids[start : start + T]], device=self.device)
        self.kv.begin_chunk(seq.table.to(self.device), start, T)
        pos = torch.arange(start, start + T, device=self.device)[None]
        want_prompt = seq.wants_prompt_logprobs
        logits = self._forward(ids, pos, seq.loops, None, keep_all=want_prompt)
        done = start + T == seq.num_tokens
        if want_prompt:
            return (logits[-1:] if done else None), logits
        return (logits if done else None), None
