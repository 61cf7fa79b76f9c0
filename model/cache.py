"""Depth-aware KV cache: one K/V buffer per layer *application*.

A call at depth K applies N(K) = P + K*C + D layers, and every application attends over its own
past keys/values, so the cache has N(K) slots indexed by virtual depth:

    prelude layer i            -> i
    core iteration t, layer j  -> P + t*C + j
    coda layer d               -> P + K*C + d

Iteration t of the core is computed the same way whatever K is, so slots [0, P + t*C) do not depend
on K. The MeSH slot buffer is per token and lives only inside one token's forward: nothing but K/V
is cached between decode steps.

`MeshCache` is a `transformers.Cache`, so `generate()` drives it; buffers are preallocated
(``max_cache_len``) or grown geometrically, and written at explicit positions (gpt-fast style).
Other caches (the server's batched pool) implement the same ``update(k, v, layer_idx, cache_kwargs)``
and receive the stage information in ``cache_kwargs``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import MeshConfig


def virtual_layer(config: MeshConfig, stage: str, index: int, iteration: int, loops: int) -> int:
    """Cache slot of one layer application (see the module docstring)."""
    p, c = config.n_prelude, config.n_core
    if stage == "prelude":
        return index
    if stage == "core":
        return p + iteration * c + index
    return p + loops * c + index  # coda


def paged_slot(config: MeshConfig, stage: str, index: int, iteration: int) -> int:
    """Slot of a layer application in a paged cache, the same for every depth: prelude i -> i, core
    iteration t layer j -> P + t*C + j, coda layer d -> P + max_loops*C + d. A depth-K sequence fills
    the slots of its prelude, iterations 0..K-1 and coda only (its coda K/V is its depth's own)."""
    p, c = config.n_prelude, config.n_core
    if stage == "prelude":
        return index
    if stage == "core":
        return p + iteration * c + index
    return p + config.max_loops * c + index  # coda


def num_paged_slots(config: MeshConfig) -> int:
    return config.n_prelude + config.max_loops * config.n_core + config.n_coda


def tiers(config: MeshConfig, loops: int) -> list[tuple[tuple, int, int]]:
    """The tiers a depth-`loops` sequence holds K/V for, as (key, first slot, layers): the prelude, core
    iterations 0..K-1 and the coda at depth K. Keys name what the K/V depends on: prelude and iteration t
    K/V are the same whatever the depth (iteration t sees only iterations <= t), the coda's is not."""
    p, c, d = config.n_prelude, config.n_core, config.n_coda
    out = [(("prelude",), 0, p)] if p else []
    out += [(("core", t), p + t * c, c) for t in range(loops if config.is_recursive else 0) if c]
    if d:
        out.append((("coda", loops), p + config.max_loops * c, d))
    return out


def kv_bytes_per_token(config: MeshConfig, loops: int | None = None, dtype: torch.dtype = torch.float32) -> int:
    """2 (K and V) * N(K) * n_heads * head_size * bytes per element."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layer_applications(loops) * config.num_attention_heads * config.head_size * elem


class MeshCacheLayer(CacheLayerMixin):
    """One layer application's K/V: a (B, nh, capacity, hs) buffer and the filled length."""

    is_compileable = False
    is_croppable = True

    def __init__(self, max_cache_len: int | None = None):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, nh, _, hs = key_states.shape
        cap = self.max_cache_len or 256
        self.keys = key_states.new_zeros((b, nh, cap, hs))
        self.values = value_states.new_zeros((b, nh, cap, hs))
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        cap = self.keys.shape[-2]
        if needed <= cap:
            return
        if self.max_cache_len is not None:
            raise ValueError(f"KV cache is full: {needed} positions needed, max_cache_len={self.max_cache_len}")
        new_cap = max(needed, 2 * cap)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], new_cap, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, cache_kwargs=None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length if cache_kwargs is None else cache_kwargs.get("cache_position", self.length)
        end = start + key_states.shape[-2]
        self._reserve(end)
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def _select(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])


class MeshCache(Cache):
    """KV cache for one call depth: ``config.num_layer_applications(loops)`` slots.

    ``MeshCache(config, loops=2, max_cache_len=512)`` preallocates 512 positions per slot on the
    first write; without ``max_cache_len`` the buffers grow geometrically.
    """

    def __init__(self, config: MeshConfig, loops: int | None = None, max_cache_len: int | None = None):
        loops = config.default_loops if loops is None else config.check_loops(loops)
        self.config, self.loops = config, loops
        super().__init__(layers=[MeshCacheLayer(max_cache_len) for _ in range(config.num_layer_applications(loops))])

    def slot(self, stage: str, index: int, iteration: int = 0) -> int:
        return virtual_layer(self.config, stage, index, iteration, self.loops)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        if dtype is None:
            first = self.layers[0]
            dtype = first.dtype if first.is_initialized else torch.float32
        return kv_bytes_per_token(self.config, self.loops, dtype)
