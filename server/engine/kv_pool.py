"""The depth-aware KV pool: K/V memory of the running batch, and the cache object the model writes to.

Rows of the running batch are kept sorted by depth, deepest first, so core iteration t of a step
touches only the prefix of rows with loops > t (the model cuts its batch the same way). Memory is held
in *tiers*:

    tier 0      prelude, core iteration 0 and coda layers (P + C + D)   every row
    tier t >= 1 core iteration t (C layers)                            rows with loops > t

each a tensor (layers, 2, rows, n_heads, length, head_size) whose row i is batch row i. A row of
depth K therefore holds N(K) = P + K*C + D layers of K/V and nothing for iterations it skips.

Joining and leaving keep the order with at most one row move per depth group (the "swap with the
group's boundary row" trick), so a request finishing costs a few row copies, not a rebuild of the batch.

Admission reserves ``kv_bytes_per_token(K) * (prompt + max_tokens)`` bytes per sequence against the
byte budget. Buffers grow (and shrink) with the batch: rows per tier to the rows that use them,
length to the longest sequence so far. Because rows share a length, the bytes allocated can exceed the
reserved ones when lengths in a batch differ a lot (`allocated_bytes` tells).
"""

from __future__ import annotations

import torch

from model import MeshConfig

from .sequence import Sequence

LENGTH_ALIGN = 16  # buffer lengths are multiples of this
MIN_LENGTH = 256  # positions allocated at least (when sequences may grow that long)


def _align(n: int) -> int:
    return -(-n // LENGTH_ALIGN) * LENGTH_ALIGN


class KVPool:
    def __init__(self, config: MeshConfig, budget_bytes: int, max_rows: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.budget, self.max_rows, self.max_len = int(budget_bytes), max_rows, max_len
        P, C, D, K = config.n_prelude, config.n_core, config.n_coda, config.max_loops
        self.nh, self.hs = config.num_attention_heads, config.head_size
        self.tier_layers = [P + C + D] + [C] * (K - 1)
        # (stage, index, iteration) of a layer application -> (tier, layer within the tier)
        self.where = {("prelude", j, 0): (0, j) for j in range(P)}
        self.where.update({("core", j, 0): (0, P + j) for j in range(C)})
        self.where.update({("core", j, t): (t, j) for t in range(1, K) for j in range(C)})
        self.where.update({("coda", j, 0): (0, P + C + j) for j in range(D)})
        self.elem = torch.empty((), dtype=dtype).element_size()

        self.rows: list[Sequence] = []  # the running batch, deepest first
        self.count_ge = [0] * (K + 2)  # count_ge[k]: rows with loops >= k (tier t holds count_ge[t + 1] rows)
        self.reserved = 0  # bytes reserved by admitted sequences
        self.bufs: list[torch.Tensor | None] = [None] * K  # (layers, 2, rows, nh, length, hs) per tier
        self.length = 0  # allocated positions per row (the same in every tier)
        self.views: dict = {}  # (stage, index, iteration) -> (K view, V view), each (rows, nh, length, hs)
        # Per-step state set by begin_prefill / begin_decode
        self.decoding = False
        self.S = 0  # keys a decode step attends over
        self.scatter_index: torch.Tensor | None = None  # (n, nh, 1, hs): each row's write position
        self.prefill_rows: torch.Tensor | None = None  # (m,): pool rows of the prefill batch
        self.T = 0

    # ---- accounting ---------------------------------------------------------------------------
    def bytes_per_token(self, loops: int) -> int:
        """KV bytes one token of a depth-`loops` row occupies: 2 * N(K) * n_heads * head_size * elem."""
        return 2 * sum(self.tier_layers[:loops]) * self.nh * self.hs * self.elem

    def bytes_needed(self, seq: Sequence) -> int:
        return self.bytes_per_token(seq.loops) * seq.max_len

    def fits(self, seq: Sequence) -> bool:
        return len(self.rows) < self.max_rows and self.reserved + self.bytes_needed(seq) <= self.budget

    @property
    def usage(self) -> float:
        """Reserved share of the budget, 0-1."""
        return self.reserved / self.budget if self.budget else 0.0

    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs if b is not None)

    def tier_rows(self, t: int) -> int:
        return self.count_ge[t + 1]

    # ---- join / leave -------------------------------------------------------------------------
    def insert(self, seq: Sequence) -> None:
        """Gives `seq` a row at the end of its depth group; shallower groups each move one row down."""
        K = seq.loops
        self.reserved += self.bytes_needed(seq)
        if not self.rows:  # first row: size the length for it (growing later costs a copy of everything)
            self.length = _align(min(seq.max_len, max(MIN_LENGTH, len(seq.prompt_ids) + 1)))
        for t in range(K):
            self._ensure_rows(t, self.count_ge[t + 1] + 1)
        self.rows.append(seq)  # placeholder at the new last row (the hole)
        hole = len(self.rows) - 1
        for j in range(1, K):  # group j (rows of depth exactly j) spans [count_ge[j+1], count_ge[j])
            first = self.count_ge[j + 1]
            if first < self.count_ge[j]:  # move its first row into the hole at its end
                self._move(self.rows[first], hole)
            hole = first
        self.rows[hole], seq.row = seq, hole
        for k in range(1, K + 1):
            self.count_ge[k] += 1

    def remove(self, seq: Sequence, clear: bool = False) -> None:
        """Frees `seq`'s row: the last row of its group fills it, then each shallower group shifts up by one.

        Positions past a row's length are masked, but a masked value still meets a zero weight, and
        0 * NaN is NaN: `clear` zeroes the row first, for a sequence whose K/V may not be finite."""
        K, hole = seq.loops, seq.row
        if clear:
            for t in range(K):
                self.bufs[t][:, :, hole].zero_()
        for j in range(K, 0, -1):
            last = self.count_ge[j] - 1  # last row of group j (after this loop's earlier moves, still valid)
            if last != hole:
                self._move(self.rows[last], hole)
            hole = last
        self.rows.pop()
        for k in range(1, K + 1):
            self.count_ge[k] -= 1
        self.reserved -= self.bytes_needed(seq)
        seq.row = -1
        for t in range(K):
            self._shrink_rows(t)
        if not self.rows:
            self.length = 0

    def _move(self, seq: Sequence, dst: int) -> None:
        src, n = seq.row, seq.num_cached
        if n:
            for t in range(seq.loops):  # a row of depth K lives in tiers 0..K-1
                b = self.bufs[t]
                b[:, :, dst, :, :n] = b[:, :, src, :, :n]
        self.rows[dst], seq.row = seq, dst

    # ---- memory -------------------------------------------------------------------------------
    def _alloc(self, layers: int, rows: int, length: int) -> torch.Tensor:
        return torch.zeros(layers, 2, rows, self.nh, length, self.hs, dtype=self.dtype, device=self.device)

    def _ensure_rows(self, t: int, rows: int) -> None:
        buf = self.bufs[t]
        have = 0 if buf is None else buf.shape[2]
        if rows <= have:
            return
        new = self._alloc(self.tier_layers[t], min(self.max_rows, max(rows, 2 * have, 4)), self.length)
        if buf is not None:
            new[:, :, :have] = buf
        self.bufs[t] = new
        self._make_views()

    def _shrink_rows(self, t: int) -> None:
        buf, n = self.bufs[t], self.count_ge[t + 1]
        if buf is None:
            return
        if n == 0:
            self.bufs[t] = None
        elif buf.shape[2] > 8 and n <= buf.shape[2] // 4:
            self.bufs[t] = buf[:, :, : 2 * n].clone()
        else:
            return
        self._make_views()

    def ensure_length(self, needed: int) -> None:
        if needed <= self.length:
            return
        # Double (few copies), but never past the longest length a running sequence may reach.
        cap = max(s.max_len for s in self.rows)
        new_len = _align(max(needed, min(cap, max(2 * self.length, MIN_LENGTH))))
        for t, buf in enumerate(self.bufs):
            if buf is not None:
                new = self._alloc(buf.shape[0], buf.shape[2], new_len)
                new[..., : self.length, :] = buf[..., : self.length, :]
                self.bufs[t] = new
        self.length = new_len
        self._make_views()

    def _make_views(self) -> None:
        self.views = {}
        for key, (t, j) in self.where.items():
            buf = self.bufs[t]
            if buf is not None:
                self.views[key] = (buf[j, 0], buf[j, 1])

    # ---- one step -----------------------------------------------------------------------------
    def begin_prefill(self, seqs: list[Sequence], T: int) -> None:
        """The next forward writes prompts of `seqs` (deepest first, right-padded to T) at positions 0..T-1."""
        self.ensure_length(T)
        self.decoding, self.T = False, T
        self.prefill_rows = torch.tensor([s.row for s in seqs], device=self.device)

    def begin_decode(self, positions: torch.Tensor, S: int) -> None:
        """The next forward writes one token per running row at `positions` (n, 1) and attends over S keys."""
        self.ensure_length(S)
        n = positions.shape[0]
        self.decoding, self.S = True, S
        self.scatter_index = positions.view(n, 1, 1, 1).expand(n, self.nh, 1, self.hs)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs: dict):
        """The model's cache hook. k, v: (n, nh, T, hs) for the first n rows of the batch -> (K, V) to attend over."""
        kb, vb = self.views[(cache_kwargs["stage"], cache_kwargs["index"], cache_kwargs["iteration"])]
        n = cache_kwargs["rows"]
        if self.decoding:
            idx = self.scatter_index[:n]
            kb[:n].scatter_(2, idx, k)
            vb[:n].scatter_(2, idx, v)
            return kb[:n, :, : self.S], vb[:n, :, : self.S]
        rows = self.prefill_rows[:n]
        kb[:, :, : self.T].index_copy_(0, rows, k)
        vb[:, :, : self.T].index_copy_(0, rows, v)
        return k, v  # a prompt attends only to itself (causal, no past)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((s.num_cached for s in self.rows), default=0)
