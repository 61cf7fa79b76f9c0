"""Runs the model for one scheduler step: builds ids, positions, masks and per-row depths, calls forward.

The forward writes K/V through the pool (`KVPool.update`); this file only prepares inputs and reads
logits. Kept small on purpose: a decode step is two small host->device tensors, one optional mask and
the model call.
"""

from __future__ import annotations

import torch

from model import MeshForCausalLM

from .kv_pool import KVPool
from .sequence import Sequence


def row_loops(seqs: list[Sequence]):
    """The model's `loops` argument: an int when the batch has one depth (cheapest), else the per-row list."""
    return seqs[0].loops if seqs[0].loops == seqs[-1].loops else [s.loops for s in seqs]


class ModelRunner:
    def __init__(self, model: MeshForCausalLM, pool: KVPool):
        self.model, self.pool, self.device = model, pool, pool.device
        self.positions = torch.arange(pool.max_len + 1, device=self.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from coda outputs (the model's own final norm and output embedding)."""
        return self.model.embed_out(self.model.final_layer_norm(h))

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]):
        """Prompts of `seqs` (deepest first) -> (last-position logits (m, V), per-seq prompt logits or None).

        Prompts are right-padded to the longest: with causal attention a real token never sees the
        padding after it, so no mask is needed; padded positions write K/V past the row's length,
        which decode masks and overwrites.
        """
        lens = [len(s.prompt_ids) for s in seqs]
        m, T = len(seqs), max(lens)
        ids = torch.tensor([s.prompt_ids + [0] * (T - n) for s, n in zip(seqs, lens)], device=self.device)  # (m, T)
        self.pool.begin_prefill(seqs, T)
        want_prompt = [s.params.prompt_logprobs for s in seqs]
        ragged = min(lens) != T
        out = self.model(
            ids, position_ids=self.positions[:T].expand(m, T), cache=self.pool, use_cache=True,
            loops=row_loops(seqs), logits_to_keep=1, output_hidden_states=ragged or any(want_prompt), cache_position=0,
        )
        if not ragged:
            last = out.logits[:, -1]  # (m, V)
        else:
            # logits_to_keep=1 gave padding positions for shorter rows: take each row's last real token.
            h = out.hidden_states[-1]  # (m, T, D): coda output, before the final norm
            last = self.head(h[torch.arange(m, device=self.device), torch.tensor(lens, device=self.device) - 1])
        prompt = None
        if any(want_prompt):
            h = out.hidden_states[-1]
            prompt = [self.head(h[i, :n]) if w else None for i, (n, w) in enumerate(zip(lens, want_prompt))]  # (n, V)
        return last, prompt

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token per running row (`seqs` in pool order, deepest first) -> logits (n, V)."""
        n = len(seqs)
        ids = torch.tensor([s.last_token for s in seqs], device=self.device).view(n, 1)
        lens = [s.num_cached for s in seqs]
        pos = torch.tensor(lens, device=self.device).view(n, 1)  # the new token's position = tokens cached
        S = max(lens) + 1
        self.pool.begin_decode(pos, S)
        # Rows of equal length attend to all S keys: no mask (the fastest attention path).
        mask = None if min(lens) + 1 == S else (self.positions[:S] <= pos).view(n, 1, 1, S)
        out = self.model(
            ids, attention_mask=mask, position_ids=pos, cache=self.pool, use_cache=True,
            loops=row_loops(seqs), logits_to_keep=1, cache_position=S - 1,
        )
        return out.logits[:, -1]
