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

Verify passes of a speculation round (g drafts resumed from their saved states at the draft depth) have
graphs of their own, per (bucket, depth, draft depth, g). Batches this does not cover run eagerly:
mixed depths, "auto" rows, prompt chunks, a graph not compiled yet, buckets above `max_batch` (on CPU
batch 1-2: the full-width gather makes graphs slower than eager from batch 4 on, docs/BENCHMARKS.md
part 8).
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
RECOMPILE_LIMIT = 256  # graphs per compiled function (dynamo's accumulated limit is 256 too)
_thread = threading.local()


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
    """The attend() hook inside a compiled step: T new tokens per row attend over the row's past, gathered
    from the pool through its unit table, and causally over themselves; their K/V are kept in `new`, in
    the order of the layer applications, for the runner to write."""

    def __init__(self, model: MeshForCausalLM, units: torch.Tensor, positions: torch.Tensor, pool: tuple):
        cfg = model.config
        self.config, self.units = cfg, units  # units (b, slots, nb)
        self.k_units, self.v_units = pool  # (U, block_size * nh * hs) each
        b, _, nb = units.shape
        block_size = self.k_units.shape[1] // (cfg.num_attention_heads * cfg.head_size)
        T = positions.shape[1]  # positions (b, T), consecutive per row
        keys = torch.arange(nb * block_size, device=units.device)
        past = (keys[None, :] < positions[:, :1]).view(b, 1, 1, -1).expand(b, 1, T, nb * block_size)  # (b, 1, T, S)
        own = torch.ones(T, T, dtype=torch.bool, device=units.device).tril().expand(b, 1, T, T)  # causal in the chunk
        self.mask = torch.cat((past, own), -1)  # (b, 1, T, S + T)
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict) -> torch.Tensor:
        """q, k, v (b, nh, T, hs) -> (b, nh, T, hs)."""
        b, nh, _, hs = q.shape
        slot = paged_slot(self.config, kw["stage"], kw["index"], kw["iteration"])
        units = self.units[:, slot]  # (b, nb)
        self.new.append((k.transpose(1, 2), v.transpose(1, 2)))  # (b, T, nh, hs)
        S = units.shape[1] * self.k_units.shape[1] // (nh * hs)
        keys = self.k_units.index_select(0, units.reshape(-1)).view(b, S, nh, hs).to(q.dtype)  # (b, S, nh, hs)
        values = self.v_units.index_select(0, units.reshape(-1)).view(b, S, nh, hs).to(q.dtype)
        keys = torch.cat((keys, k.transpose(1, 2)), 1).transpose(1, 2)  # (b, nh, S + T, hs)
        values = torch.cat((values, v.transpose(1, 2)), 1).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)


def graph_step(model: MeshForCausalLM, first, positions, units, pool: tuple, plan: tuple):
    """The model's stages over T tokens per row, plan = (t0, loops) (Python constants: one graph
    each): a decode step from ids (first (b, 1), t0 = 0: embeddings and prelude), or a speculation round's
    g draft inputs resumed from their saved states at the draft depth t0 (first: the state dict); then
    iterations t0..loops-1 and the coda -> (logits (b, T, V), state after the last iteration, new K (b,
    layer applications, T, nh, hs), new V). pool: the K/V pool's (k_units, v_units)."""
    t0, loops = plan
    attn = PoolAttention(model, units, positions, pool)
    ctx = model.layer_context(positions, cache=attn, loops=loops)
    state = model.start(model.embed(first), ctx) if t0 == 0 else first
    state = model.iterate(state, t0, loops, ctx)
    logits = model.compute_logits(model.finish(state, ctx))
    return logits, state, torch.stack([k for k, _ in attn.new], 1), torch.stack([v for _, v in attn.new], 1)


def used_slots(model: MeshForCausalLM, loops: int, t0: int = 0) -> list[int]:
    """The paged slots a depth-`loops` step from iteration t0 writes, in the order its graph returns them."""
    cfg = model.config
    out = [paged_slot(cfg, "prelude", j, 0) for j in range(cfg.n_prelude)] if t0 == 0 else []
    out += [paged_slot(cfg, "core", j, t) for t in range(t0, loops if cfg.is_recursive else 0) for j in range(cfg.n_core)]
    return out + [paged_slot(cfg, "coda", j, 0) for j in range(cfg.n_coda)]


class CompiledDecoder:
    """Graphs of graph_step: decode steps per (bucket, depth), verify passes per (bucket, depth, draft depth,
    drafts).
    A graph's key is (kind, bucket, loops, t0, T). `ready` says whether one can run now; `want` asks for
    one (compiled by the background thread on CPU, or at once in the caller's thread on CUDA, where CUDA
    graphs are captured by the thread that replays them)."""

    def __init__(self, model: MeshForCausalLM, kv, max_blocks: int, max_batch: int, background: bool):
        cache_dir()
        self.model, self.kv, self.max_blocks, self.max_batch = model, kv, max_blocks, max_batch
        model.layer_context(torch.zeros(1, 1, dtype=torch.long, device=kv.kv.device))  # builds the rotary table outside any graph
        mode = None
        if kv.kv.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs; the pool keeps its address, so replays must not copy it
            torch._dynamo.mark_static_address(kv.k_units)
            torch._dynamo.mark_static_address(kv.v_units)
        self.fn = torch.compile(graph_step, dynamic=False, mode=mode)
        self.slots: dict[tuple, list[int]] = {}  # (loops, t0) -> used_slots
        self._ready: set[tuple] = set()
        self._asked: set[tuple] = set()
        self.failed: str | None = None
        self.steps = 0  # steps run by a graph (decode steps and verify passes)
        self.runs = {"decode": 0, "verify": 0}  # the same by kind
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue()
            threading.Thread(target=self._compile_loop, name="mesh-compile", daemon=True).start()

    @staticmethod
    def key(n: int, loops: int, t0: int = 0, T: int = 1) -> tuple:
        return ("verify" if t0 else "decode", bucket(n), loops, t0, T)

    def covers(self, n: int) -> bool:
        return self.failed is None and n <= self.max_batch

    def ready(self, n: int, loops: int, t0: int = 0, T: int = 1) -> bool:
        return self.key(n, loops, t0, T) in self._ready

    def want(self, n: int, loops: int, t0: int = 0, T: int = 1) -> None:
        key = self.key(n, loops, t0, T)
        if key in self._asked or not self.covers(n):
            return
        self._asked.add(key)
        if self._queue is not None:
            self._queue.put(key)
        else:
            self._compile(key)

    def warm_up(self, loops: int, batches=(1,), t0: int = 0, T: int = 1) -> None:
        """Compile now (startup, benchmarks): the given batch buckets at depth `loops` (verify passes
        from the draft depth t0 with T drafts when t0 > 0)."""
        for n in batches:
            if self.covers(n):
                key = self.key(n, loops, t0, T)
                self._asked.add(key)
                self._compile(key)

    def _compile_loop(self) -> None:
        while True:
            self._compile(self._queue.get())

    def _inputs(self, key: tuple) -> tuple:
        """Dummy inputs of a graph's shapes (padding rows look the same: token 0 at position 0, unit 0)."""
        kind, b, loops, t0, T = key
        device, cfg = self.kv.kv.device, self.model.config
        positions = torch.zeros(b, T, dtype=torch.long, device=device)
        units = torch.zeros(b, num_paged_slots(cfg), self.max_blocks, dtype=torch.long, device=device)
        if kind == "decode":
            return torch.zeros(b, 1, dtype=torch.long, device=device), positions, units
        with torch.inference_mode():  # a draft state: ids 0 through the prelude and iterations 0..t0-1
            ctx = self.model.layer_context(positions, loops=t0)
            state = self.model.iterate(self.model.start(self.model.embed(positions), ctx), 0, t0, ctx)
        return state, positions, units

    def _call(self, key: tuple, first, positions, units):
        _, _, loops, t0, _ = key
        pool = (self.kv.k_units, self.kv.v_units)
        if not getattr(_thread, "limit_set", False):
            # One graph per shape and depth: more than dynamo's default of 8 per function. Set in each calling
            # thread: a value set in the main thread does not reach the engine and compile threads (and a
            # config.patch() around every call costs about 1 ms).
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
            _thread.limit_set = True
        return self.fn(self.model, first, positions, units, pool, (t0, loops))

    def _compile(self, key: tuple) -> None:
        inputs = self._inputs(key)
        try:
            with torch.inference_mode():
                for _ in range(2 if self.kv.kv.device.type == "cuda" else 1):  # CUDA graphs record on the second call
                    self._call(key, *inputs)
        except Exception as exc:  # a compiler that cannot build here: serve eagerly, say why once
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("compile failed, decoding eagerly: %s", self.failed)
            return
        self._ready.add(key)
        log.info("compiled %s graph: batch bucket %d, loops %d%s", key[0], key[1], key[2],
                 f", from iteration {key[3]}, {key[4]} tokens" if key[0] == "verify" else "")

    def run(self, first, positions: torch.Tensor, tables: torch.Tensor, write_index: torch.Tensor, loops: int,
            t0: int = 0):
        """A decode step (first = ids (n, 1), t0 = 0) or verify passes (first = draft states (n, g, ...), t0 =
        the draft depth); positions (n, T), tables (n, slots, max_blocks), write_index (n, slots, T) ->
        (logits (n, T, V), state (n rows)); the new K/V are written to the pool."""
        n, T = positions.shape
        key, kv = self.key(n, loops, t0, T), self.kv
        self.steps += 1
        self.runs[key[0]] += 1
        pad = key[1] - n
        if pad:  # padding rows: token 0 at position 0 over unit 0, results dropped, nothing written
            positions = torch.cat((positions, positions.new_zeros(pad, T)))
            tables = torch.cat((tables, tables.new_zeros(pad, *tables.shape[1:])))
            first = torch.cat((first, first.new_zeros(pad, *first.shape[1:]))) if torch.is_tensor(first) else \
                {name: torch.cat((v, v.new_zeros(pad, *v.shape[1:]))) for name, v in first.items()}
        logits, state, new_k, new_v = self._call(key, first, positions, tables)
        slots = self.slots.get((loops, t0)) or self.slots.setdefault((loops, t0), used_slots(self.model, loops, t0))
        idx = write_index[:, slots].reshape(-1)  # (n * slots * T,)
        kv.k_flat.index_copy_(0, idx, new_k[:n].reshape(-1, *new_k.shape[3:]).to(kv.kv.dtype))
        kv.v_flat.index_copy_(0, idx, new_v[:n].reshape(-1, *new_v.shape[3:]).to(kv.kv.dtype))
        return logits[:n], {name: v[:n] for name, v in state.items()}
