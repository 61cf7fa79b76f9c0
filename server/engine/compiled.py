"""Compiled decode steps (``--compile``): the model's stages traced by torch.compile into one graph per
(batch bucket, depth), with static shapes, as gpt-fast and nano-vllm do; on CUDA captured as CUDA
graphs (mode "reduce-overhead").

A decode batch of n rows of one depth K runs as the graph of (bucket(n), K): rows padded to the bucket,
block tables at their full width (max_blocks), so a graph never sees a new shape. Inside it attention
is `PoolAttention`: each row's past K/V are gathered from the pool and the new token attends over them
and over itself; the step's new K/V are returned, not written. A graph is then a pure function of its
inputs (the pool is only read): CUDA graph capture needs that, and it lets a background thread compile
graphs with dummy inputs while eager steps serve. The runner writes the new K/V with one index_copy_ per
step instead of two per layer application.

Batches this does not cover run eagerly: mixed depths, "auto" rows, prompt chunks and verify passes, a
graph not compiled yet, buckets above `max_batch` (on CPU batch 1-2: the full-width gather makes graphs
slower than eager from batch 4 on, docs/BENCHMARKS.md part 8).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import torch

from model import MeshForCausalLM, num_paged_slots, paged_slot

log = logging.getLogger("mesh.engine")
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODES = ("auto", "on", "off")


def cache_dir() -> Path:
    """Inductor's on-disk cache (compiled kernels survive restarts): $TORCHINDUCTOR_CACHE_DIR, else
    ~/.cache/mesh/inductor."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "mesh" / "inductor")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_mode(mode: str, device: torch.device) -> tuple[bool, int]:
    """--compile -> (compile at all, largest batch bucket compiled). auto: on with CUDA, off on CPU (each
    graph costs ~20 s of compile there for a gain at batch 1-2 only); on: every bucket on CUDA, buckets
    1-2 on CPU (docs/BENCHMARKS.md part 8)."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "off":
        return False, 0
    if device.type == "cuda":
        return True, BUCKETS[-1]
    return (True, 2) if mode == "on" else (False, 0)


def bucket(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


class PoolAttention:
    """The attend() hook inside a compiled decode step: one new token per row attends over its past,
    gathered from the pool through its unit table, and over itself; its K/V are kept in `new`, in the
    order of the layer applications, for the runner to write."""

    def __init__(self, model: MeshForCausalLM, units: torch.Tensor, positions: torch.Tensor, k_units, v_units,
                 block_size: int):
        cfg = model.config
        self.config, self.units, self.k_units, self.v_units = cfg, units, k_units, v_units  # units (b, slots, nb)
        b, _, nb = units.shape
        keys = torch.arange(nb * block_size, device=units.device)
        past = keys[None, :] < positions[:, None]  # (b, S): the keys before each row's new token
        self.mask = torch.cat((past, past.new_ones(b, 1)), 1)[:, None, None]  # (b, 1, 1, S + 1): and itself
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict) -> torch.Tensor:
        """q, k, v (b, nh, 1, hs) -> (b, nh, 1, hs)."""
        b, nh, _, hs = q.shape
        slot = paged_slot(self.config, kw["stage"], kw["index"], kw["iteration"])
        units = self.units[:, slot]  # (b, nb)
        S = units.shape[1] * self.k_units.shape[1] // (nh * hs)
        keys = self.k_units.index_select(0, units.reshape(-1)).view(b, S, nh, hs).to(q.dtype)  # (b, S, nh, hs)
        values = self.v_units.index_select(0, units.reshape(-1)).view(b, S, nh, hs).to(q.dtype)
        keys = torch.cat((keys, k.transpose(1, 2)), 1).transpose(1, 2)  # (b, nh, S + 1, hs)
        values = torch.cat((values, v.transpose(1, 2)), 1).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)
        self.new.append((k[:, :, 0], v[:, :, 0]))
        return y


def decode_step(model: MeshForCausalLM, ids, positions, units, k_units, v_units, block_size: int, loops: int):
    """One decode token per row at depth `loops` through the model's stages ->
    (logits (b, V), recurrence state after iteration loops, new K (b, N(K), nh, hs), new V)."""
    attn = PoolAttention(model, units, positions, k_units, v_units, block_size)
    ctx = model.layer_context(positions[:, None], cache=attn, loops=loops)
    state = model.iterate(model.start(model.embed(ids), ctx), 0, loops, ctx)
    logits = model.compute_logits(model.finish(state, ctx)[:, -1])
    return logits, state, torch.stack([k for k, _ in attn.new], 1), torch.stack([v for _, v in attn.new], 1)


def used_slots(model: MeshForCausalLM, loops: int) -> list[int]:
    """The paged slots a depth-`loops` step writes, in the order decode_step returns their K/V."""
    cfg = model.config
    out = [paged_slot(cfg, "prelude", j, 0) for j in range(cfg.n_prelude)]
    out += [paged_slot(cfg, "core", j, t) for t in range(loops if cfg.is_recursive else 0) for j in range(cfg.n_core)]
    return out + [paged_slot(cfg, "coda", j, 0) for j in range(cfg.n_coda)]


class CompiledDecoder:
    """Graphs of decode_step per (bucket, depth). `ready` says whether one can run now; `want` asks for
    one (compiled by the background thread on CPU, or at once in the caller's thread on CUDA, where CUDA
    graphs are captured by the thread that replays them)."""

    def __init__(self, model: MeshForCausalLM, kv, max_blocks: int, max_batch: int, background: bool):
        cache_dir()
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):  # one graph per (bucket, depth): more than the default 8
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        self.model, self.kv, self.max_blocks, self.max_batch = model, kv, max_blocks, max_batch
        model.layer_context(torch.zeros(1, 1, dtype=torch.long, device=kv.kv.device))  # builds the rotary table outside any graph
        mode = None
        if kv.kv.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs; the pool keeps its address, so replays must not copy it
            torch._dynamo.mark_static_address(kv.k_units)
            torch._dynamo.mark_static_address(kv.v_units)
        self.fn = torch.compile(decode_step, dynamic=False, mode=mode)
        self.slots = {K: used_slots(model, K) for K in range(1, model.config.max_loops + 1)}
        self._ready: set[tuple[int, int]] = set()
        self._asked: set[tuple[int, int]] = set()
        self.failed: str | None = None
        self.steps = 0  # decode steps run by a graph
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue()
            threading.Thread(target=self._compile_loop, name="mesh-compile", daemon=True).start()

    def covers(self, n: int) -> bool:
        return self.failed is None and n <= self.max_batch

    def ready(self, n: int, loops: int) -> bool:
        return (bucket(n), loops) in self._ready

    def want(self, n: int, loops: int) -> None:
        key = (bucket(n), loops)
        if key in self._asked or not self.covers(n):
            return
        self._asked.add(key)
        if self._queue is not None:
            self._queue.put(key)
        else:
            self._compile(*key)

    def warm_up(self, loops: int, batches=(1,)) -> None:
        """Compile now (startup): the given batch buckets at depth `loops`."""
        for n in batches:
            if self.covers(n):
                self._asked.add((bucket(n), loops))
                self._compile(bucket(n), loops)

    def _compile_loop(self) -> None:
        while True:
            self._compile(*self._queue.get())

    def _compile(self, b: int, loops: int) -> None:
        kv, device = self.kv, self.kv.kv.device
        ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        positions = torch.zeros(b, dtype=torch.long, device=device)
        units = torch.zeros(b, num_paged_slots(self.model.config), self.max_blocks, dtype=torch.long, device=device)
        try:
            with torch.inference_mode():
                for _ in range(2 if device.type == "cuda" else 1):  # CUDA graphs record on the second call
                    self.fn(self.model, ids, positions, units, kv.k_units, kv.v_units, kv.block_size, loops)
        except Exception as exc:  # a compiler that cannot build here: serve eagerly, say why once
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("compile failed, decoding eagerly: %s", self.failed)
            return
        self._ready.add((b, loops))
        log.info("compiled decode graph: batch bucket %d, loops %d", b, loops)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, write_index: torch.Tensor, loops: int):
        """ids (n, 1), positions (n,), tables (n, slots, max_blocks), write_index (n, slots) -> (logits (n, V),
        state (n rows)); the new K/V are written to the pool."""
        n, b, kv = ids.shape[0], bucket(ids.shape[0]), self.kv
        self.steps += 1
        if b > n:  # padding rows: token 0 at position 0 over unit 0, results dropped, nothing written
            pad = b - n
            ids = torch.cat((ids, ids.new_zeros(pad, 1)))
            positions = torch.cat((positions, positions.new_zeros(pad)))
            tables = torch.cat((tables, tables.new_zeros(pad, *tables.shape[1:])))
        logits, state, new_k, new_v = self.fn(self.model, ids, positions, tables, kv.k_units, kv.v_units,
                                              kv.block_size, loops)
        slots = self.slots[loops]
        idx = write_index[:, slots].reshape(-1)  # (n * N(K),)
        kv.k_flat.index_copy_(0, idx, new_k[:n].reshape(-1, *new_k.shape[2:]).to(kv.kv.dtype))
        kv.v_flat.index_copy_(0, idx, new_v[:n].reshape(-1, *new_v.shape[2:]).to(kv.kv.dtype))
        return logits[:n], {name: v[:n] for name, v in state.items()}
