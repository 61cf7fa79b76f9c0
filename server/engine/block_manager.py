"""The K/V block pool's bookkeeping: which unit blocks are free, which sequence holds which, and the
depth-aware prefix cache.

A *unit* is one layer application's K/V for ``block_size`` tokens (a row of the pool tensor in
kv_cache.py). A *block* is the K/V of one tier for ``block_size`` tokens: one unit per layer of the
tier (the prelude, one core iteration, or the coda at depth K; see ``model.tiers``). A depth-K sequence
holds one block per tier for each ``block_size`` tokens, so its memory is N(K) = P + K*C + D units per
block of tokens: memory follows depth.

Prefix caching: a full block is hashed by (chain hash of every token up to its end, tier key). Prelude
and core-iteration keys carry no depth (their K/V is the same at any depth); the coda key carries K.
A new sequence reuses the longest run of leading token blocks for which every one of its tiers is
cached, and computes from there. A deeper request cannot use a shallower one's prefix alone: its extra
iterations need the prefix's hidden states, which are not kept. Blocks whose last holder is gone stay
cached (LRU) until their units are needed; without prefix caching they are freed at once, but blocks
still held (the other choices of an ``n > 1`` request, identical concurrent prompts) are still shared.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

from model import MeshConfig, num_paged_slots, tiers


class Block:
    __slots__ = ("units", "ref", "key")

    def __init__(self, units: list[int]):
        self.units, self.ref, self.key = units, 1, None


class BlockManager:
    def __init__(self, config: MeshConfig, num_units: int, block_size: int, max_model_len: int, *,
                 enable_prefix_caching: bool = True, watermark: float = 0.01, clear=None):
        self.config, self.block_size, self.num_units = config, block_size, num_units
        self.max_blocks = -(-max_model_len // block_size)  # per sequence
        self.num_slots = num_paged_slots(config)
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark = max(1, int(watermark * num_units))  # units admission leaves free for running rows
        self._tiers = {k: tiers(config, k) for k in range(1, config.max_loops + 1)}
        self.free_units: deque[int] = deque(range(num_units))
        self.index: dict[tuple, Block] = {}  # hashed blocks, held or cached
        self.cached: OrderedDict[tuple, Block] = OrderedDict()  # unheld hashed blocks, least recent first
        self.num_cached_units = 0
        self.clear = clear  # zeroes units (kv_cache.PagedKVCache.clear) whose K/V may not be finite

    # ---- accounting -------------------------------------------------------------------------
    def units_per_block(self, loops: int) -> int:
        """Units a depth-`loops` sequence needs per block of tokens: N(K)."""
        return sum(n for _, _, n in self._tiers[loops])

    @property
    def num_free(self) -> int:
        """Units an allocation can get: free ones and evictable cached ones."""
        return len(self.free_units) + self.num_cached_units

    @property
    def num_used(self) -> int:
        return self.num_units - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_units

    def units_needed(self, seq, num_tokens: int) -> int:
        """Units `seq` must allocate to hold `num_tokens` more tokens than it has computed."""
        have = len(seq.blocks[0]) if seq.blocks else 0
        need = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, need - have) * self.units_per_block(seq.loops)

    def can_ever_fit(self, num_tokens: int, loops: int) -> bool:
        return -(-num_tokens // self.block_size) * self.units_per_block(loops) <= self.num_units

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, seq, num_tokens: int, reserve: int = 0) -> bool:
        """Gives `seq` blocks for `num_tokens` more tokens, all or nothing; False when fewer than the
        needed units (+ `reserve`) are free. Evicts least recently used cached blocks as needed. If
        anything raises midway, `seq` and the free list are as before (evicted blocks stay evicted)."""
        need = self.units_needed(seq, num_tokens)
        if need + reserve > self.num_free:
            return False
        if need == 0:
            return True
        if not seq.blocks:
            self._init_tables(seq)
        have, units = len(seq.blocks[0]), []
        try:
            for _ in range(need):
                units.append(self._take_unit())
            it = iter(units)
            while len(seq.blocks[0]) * self.block_size < seq.num_computed + num_tokens:
                for i, (_, first, n) in enumerate(self._tiers[seq.loops]):
                    self._append(seq, i, first, Block([next(it) for _ in range(n)]))
        except BaseException:
            for tier in seq.blocks:
                del tier[have:]
            self.free_units.extend(units)
            raise
        return True

    def _init_tables(self, seq) -> None:
        seq.blocks = [[] for _ in self._tiers[seq.loops]]
        seq.table = torch.zeros(self.num_slots, self.max_blocks, dtype=torch.long)

    def _append(self, seq, tier: int, first_slot: int, block: Block) -> None:
        col = len(seq.blocks[tier])
        seq.blocks[tier].append(block)
        seq.table[first_slot : first_slot + len(block.units), col] = torch.tensor(block.units)

    def _take_unit(self) -> int:
        if not self.free_units:
            key, block = self.cached.popitem(last=False)  # evict the least recently used
            del self.index[key]
            self.num_cached_units -= len(block.units)
            self.free_units.extend(block.units)
        return self.free_units.popleft()

    def free(self, seq, discard: bool = False) -> None:
        """Releases every block of `seq`, last blocks first (so they are evicted first). `discard`: the
        K/V may be garbage (a failed row): never cache it, and zero the units it gives back."""
        released: list[int] = []
        for tier in seq.blocks:
            for block in reversed(tier):
                block.ref -= 1
                if block.ref > 0:
                    continue
                if block.key is not None and self.enable_prefix_caching and not discard:
                    self.cached[block.key] = block
                    self.num_cached_units += len(block.units)
                    continue
                if block.key is not None:
                    del self.index[block.key]
                released += block.units
        if discard and self.clear is not None:
            self.clear(released)
        self.free_units.extend(released)
        seq.blocks, seq.block_hashes, seq.table = [], [], None
        seq.num_computed = seq.num_committed = 0

    def trim(self, seq, num_tokens: int) -> None:
        """Releases the blocks past the first `num_tokens` tokens (rejected draft positions)."""
        keep = -(-num_tokens // self.block_size)
        for tier in seq.blocks:
            for block in tier[keep:]:
                block.ref -= 1
                if block.ref == 0:  # never hashed: they hold no full block of verified tokens
                    self.free_units.extend(block.units)
            del tier[keep:]

    def units_of(self, seq) -> list[int]:
        return [u for tier in seq.blocks for block in tier for u in block.units]

    # ---- prefix caching ---------------------------------------------------------------------
    def _hashes(self, seq, upto: int) -> list[int]:
        """Chain hashes of the first `upto` full blocks of seq.token_ids (cached on the sequence)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < upto:
            i = len(hashes)
            hashes.append(hash((hashes[-1] if hashes else None, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        return hashes

    def match_prefix(self, seq) -> int:
        """Shares the cached blocks of the longest cached prefix with `seq` (computed 0 so far); returns the
        tokens hit. The last token always runs: its logits give the next token."""
        if seq.wants_prompt_logprobs:
            return 0
        full = (seq.num_tokens - 1) // self.block_size
        tiers_ = self._tiers[seq.loops]
        hit = 0
        for h in self._hashes(seq, full):
            blocks = [self.index.get((h, key)) for key, _, _ in tiers_]
            if any(b is None for b in blocks):
                break
            if not seq.blocks:
                self._init_tables(seq)
            for i, ((key, first, _), block) in enumerate(zip(tiers_, blocks)):
                if block.ref == 0:
                    del self.cached[(h, key)]
                    self.num_cached_units -= len(block.units)
                block.ref += 1
                self._append(seq, i, first, block)
            hit += 1
        seq.num_committed = hit
        seq.num_computed = hit * self.block_size
        return seq.num_computed

    def commit(self, seq) -> None:
        """Registers the blocks `seq` has filled since the last call, so later sequences can share them."""
        full = seq.num_computed // self.block_size
        tiers_ = self._tiers[seq.loops]
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed, full):
            h = hashes[i]
            for t, (key, _, _) in enumerate(tiers_):
                block = seq.blocks[t][i]
                if (h, key) not in self.index:  # else an identical block exists; this one stays private
                    block.key = (h, key)
                    self.index[block.key] = block
        seq.num_committed = max(seq.num_committed, full)
