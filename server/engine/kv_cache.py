"""The paged K/V pool: one tensor allocated at start, and the cache object the model attends through.

    k_pool, v_pool: (num_units, block_size, n_heads, head_size)   one unit = one layer application's
                                                                  K/V for block_size tokens

It is the only K/V memory the engine holds, so its size is a hard cap. The model's attention calls
``attend(q, k, v, cache_kwargs)`` for every layer application; before a forward the runner calls
`begin_decode` (one token for each of n rows, rows sorted deepest first) or `begin_chunk` (T tokens of
each of n sequences: a prompt chunk, or verify passes). Per paged slot (model.paged_slot), a row's unit ids come from its block table, so:

- the new K/V go to ``unit * block_size + position % block_size`` (one index_copy_ per tensor);
- on CPU, decode steps and verify passes (at most KERNEL_MAX_T queries per row) attend with the kernel
  of paged_attention.py, which reads each row's keys in place through its unit table;
- otherwise the keys a row attends over are its units gathered in order, (n, blocks * block_size, nh,
  hs), masked past the row's length, for SDPA. The gather is a copy per layer application (on CUDA a
  paged-attention kernel would read the blocks in place; the compiled graphs of compiled.py gather too).

Unused pool memory is zero, never uninitialised: a masked key still meets a zero attention weight, and
0 * NaN would be NaN. Units of a row whose K/V may not be finite are zeroed when freed (`clear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import MeshConfig, paged_slot

from . import paged_attention

KERNEL_MAX_T = 8  # queries per row up to which the CPU kernel beats gather + SDPA (decode: 1, verify: g)


class PagedKVCache:
    def __init__(self, config: MeshConfig, num_units: int, block_size: int, dtype: torch.dtype, device,
                 compute_dtype: torch.dtype | None = None):
        """dtype: the pool's (--kv-cache-dtype); compute_dtype: the model's, which attention runs in."""
        self.block_size, self.num_units = block_size, num_units
        self.compute_dtype = compute_dtype or dtype
        nh, hs = config.num_attention_heads, config.head_size
        self.kv = torch.zeros(2, num_units, block_size, nh, hs, dtype=dtype, device=device)
        self.k_pool, self.v_pool = self.kv[0], self.kv[1]
        self.k_flat = self.k_pool.view(num_units * block_size, nh, hs)  # row = unit * block_size + offset
        self.v_flat = self.v_pool.view(num_units * block_size, nh, hs)
        self.k_units = self.k_pool.view(num_units, block_size * nh * hs)  # row = one unit
        self.v_units = self.v_pool.view(num_units, block_size * nh * hs)
        p, c, d, K = config.n_prelude, config.n_core, config.n_coda, config.max_loops
        keys = [("prelude", j, 0) for j in range(p)] + [("coda", j, 0) for j in range(d)]
        keys += [("core", j, t) for t in range(K) for j in range(c)]
        self.slot = {key: paged_slot(config, *key) for key in keys}
        self.decoding = True
        self.tables = self.write_index = self.mask = self.lengths = None
        # CPU: attention reads the blocks in place (paged_attention.py) for decode and verify steps
        self.kernel = paged_attention.load() if self.kv.device.type == "cpu" and self.compute_dtype == torch.float32 else None
        self.row_index = None  # decode: the batch rows a layer application runs on, when not a prefix

    @staticmethod
    def unit_bytes(config: MeshConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * block_size * config.num_attention_heads * config.head_size * elem

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def clear(self, units: list[int]) -> None:
        if units:
            self.kv[:, torch.tensor(units, device=self.kv.device)] = 0

    # ---- per step -----------------------------------------------------------------------------
    def begin_decode(self, tables: torch.Tensor, positions: torch.Tensor) -> None:
        """tables (n, slots, blocks): the rows' unit ids; positions (n,): each new token's position."""
        bs = self.block_size
        n, slots, nb = tables.shape
        blk = (positions // bs).view(n, 1, 1).expand(n, slots, 1)
        self.write_index = tables.gather(2, blk).squeeze(2) * bs + (positions % bs).view(n, 1)  # (n, slots)
        self.tables, self.decoding = tables, True
        self.lengths = (positions + 1).view(n, 1)  # keys each row's query sees: its past and itself
        if self.kernel is not None:  # it masks by lengths
            self.mask = None
            return
        S = nb * bs
        keys = torch.arange(S, device=positions.device)
        visible = (keys[None, :] < self.lengths).view(n, 1, 1, S)  # (n, 1, 1, S)
        # An additive mask, built once a step: a boolean one is converted inside every attention call.
        self.mask = torch.zeros(visible.shape, dtype=self.compute_dtype, device=self.kv.device).masked_fill_(~visible, float("-inf"))

    def begin_chunk(self, tables: torch.Tensor, starts: list[int], T: int) -> None:
        """T tokens of each of n sequences, sequence i's from starts[i] on (a prompt chunk: n = 1; verify
        passes of equal length: n >= 1); tables (n, slots, blocks) cover them."""
        bs, device = self.block_size, tables.device
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (n, T)
        nb = -(-(max(starts) + T) // bs)
        self.tables = tables[:, :, :nb]  # (n, slots, nb)
        blk = (pos // bs)[:, None, :].expand(-1, tables.shape[1], -1)  # (n, slots, T)
        self.write_index = tables.gather(2, blk) * bs + (pos % bs)[:, None, :]  # (n, slots, T)
        self.decoding = False
        self.lengths = pos + 1  # (n, T): causal
        if max(starts) or len(starts) > 1:
            keys = torch.arange(nb * bs, device=device)
            visible = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (n, 1, T, S): causal over the cached past
            self.mask = torch.zeros(visible.shape, dtype=self.compute_dtype, device=device).masked_fill_(~visible, float("-inf"))
        else:
            self.mask = None

    # ---- the model's hook ---------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict) -> torch.Tensor:
        """q, k, v: (n, nh, T, hs) for the first n rows -> attention output (n, nh, T, hs)."""
        slot = self.slot[(kw["stage"], kw["index"], kw["iteration"])]
        n = kw["rows"]
        if self.row_index is not None:  # adaptive depth: rows still iterating, any subset of the batch
            return self._attend_rows(q, k, v, slot, self.row_index)
        dt = self.kv.dtype
        if self.decoding:
            idx = self.write_index[:n, slot]
            self.k_flat.index_copy_(0, idx, k[:, :, 0].to(dt))
            self.v_flat.index_copy_(0, idx, v[:, :, 0].to(dt))
        else:
            idx = self.write_index[:n, slot].reshape(-1)  # (n * T,)
            self.k_flat.index_copy_(0, idx, k.transpose(1, 2).reshape(-1, *k.shape[1:2], k.shape[-1]).to(dt))
            self.v_flat.index_copy_(0, idx, v.transpose(1, 2).reshape(-1, *v.shape[1:2], v.shape[-1]).to(dt))
            if self.mask is None:  # one chunk at position 0 attends to itself only
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._attend_blocks(q, self.tables[:n, slot], _rows(self.mask, slice(0, n)), self.lengths[:n])

    def _attend_rows(self, q, k, v, slot: int, rows: torch.Tensor) -> torch.Tensor:
        """attend() for decode rows `rows` (an index into the step's batch) instead of its first n."""
        idx = self.write_index[rows, slot]
        self.k_flat.index_copy_(0, idx, k[:, :, 0].to(self.kv.dtype))
        self.v_flat.index_copy_(0, idx, v[:, :, 0].to(self.kv.dtype))
        return self._attend_blocks(q, self.tables[rows, slot], _rows(self.mask, rows), self.lengths[rows])

    def _attend_blocks(self, q: torch.Tensor, units: torch.Tensor, mask, lengths: torch.Tensor) -> torch.Tensor:
        """q (n, nh, T, hs) over each row's units (n, nb) of one slot, in order: the first lengths (n, T)
        keys of each query, read in place by the kernel, or gathered for SDPA under mask (n, 1, T, S)."""
        if self.kernel is not None and q.shape[2] <= KERNEL_MAX_T:
            out = self.kernel.decode(q.transpose(1, 2).contiguous(), self.k_pool, self.v_pool, units.contiguous(),
                                     lengths.contiguous(), q.shape[-1] ** -0.5)  # (n, T, nh, hs)
            return out.transpose(1, 2)
        n, nb = units.shape
        nh, hs = q.shape[1], q.shape[-1]
        units = units.reshape(-1)
        # index_select of whole units (rows of block_size * nh * hs values) runs at copy speed; advanced
        # indexing of the 4D pool is elementwise and about 4x slower.
        keys = self.k_units.index_select(0, units).view(n, nb * self.block_size, nh, hs).transpose(1, 2)  # (n, nh, S, hs)
        values = self.v_units.index_select(0, units).view(n, nb * self.block_size, nh, hs).transpose(1, 2)
        if keys.dtype != q.dtype:  # a pool in another dtype (--kv-cache-dtype): attention runs in the model's
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _rows(mask, rows):
    return None if mask is None else mask[rows]
