"""2. Cost per recursion depth: decode time for K = 1..max_loops, MeSH against the base scheme, KV bytes.

For each depth K, scheme (the subject's MeSH model and a `base`-scheme model of the same layout) and
batch size, an engine holds that many rows of depth K after a 32-token prompt; single decode steps
(scheduler + runner + sampling) are timed round-robin over all of them, in blocks of consecutive steps. A step at depth K applies
N(K) = P + K*C + D layers, so its time should be a + b*K: the fit's slope b is the price of one more
core iteration, compared with one core pass timed alone (C core layers attending over the same
number of keys, plus the scheme's step: MeSH's write/read routers), interleaved with the rest.
MeSH's overhead is the median over rounds of the paired ratio mesh/base - 1 (same round, same load),
per (batch, K) and pooled over all of them (`mesh_overhead_all`, the headline figure).

KV bytes per token are measured from the paged pool after admitting depth-K rows (units held per token
per position, summed over the tiers a depth-K row occupies) and checked against 2 * N(K) * d * bytes.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from model.modeling import rotary_cos_sin

from .common import FixedBatch, Subject, interleave, linear_fit, median, random_model


def base_twin(subject: Subject, seed: int = 0) -> Subject:
    """The same layout and dimensions with the `base` recurrence (h' = core(h)), random weights."""
    config = copy.deepcopy(subject.config)
    config.scheme = "base"
    p = next(subject.model.parameters())
    return Subject(random_model(config, seed, p.device, p.dtype), subject.tokenizer, "base twin", None)


class CorePass:
    """One core iteration on (B, 1, D) hidden states at a position with S-1 past keys: the C shared
    layers (through a cache that returns S keys, as the pool does) and the scheme's step."""

    class _Keys:
        def __init__(self, layers, B, nh, S, hs, like):
            self.S = S
            self.kv = [(like.new_zeros(B, nh, S, hs), like.new_zeros(B, nh, S, hs)) for _ in range(layers)]

        def update(self, k, v, layer_idx, kw):
            kb, vb = self.kv[kw["index"]]
            kb[:, :, self.S - 1 : self.S] = k
            vb[:, :, self.S - 1 : self.S] = v
            return kb, vb

    def __init__(self, model, B: int, S: int):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.B, self.S = model, B, S
        h = torch.randn(B, 1, cfg.hidden_size, device=p.device, dtype=p.dtype)
        self.state = {"h": h}
        if cfg.scheme == "mesh":
            self.state["mem"] = torch.randn(B, 1, cfg.mesh_slots, cfg.hidden_size, device=p.device, dtype=p.dtype)
        elif cfg.scheme in ("anchor", "anchor_emb"):
            self.state["anchor"] = h.clone()
        pos = torch.full((B, 1), S - 1, device=p.device)
        self.cos, self.sin = rotary_cos_sin(cfg, pos, p.dtype)
        self.keys = self._Keys(cfg.n_core, B, cfg.num_attention_heads, S, cfg.head_size, h)

    @torch.inference_mode()
    def __call__(self) -> None:
        h = self.state["h"]
        for j, layer in enumerate(self.model.core):
            kw = {"cache_position": self.S - 1, "stage": "core", "index": j, "iteration": 1, "rows": self.B}
            h = layer(h, self.cos, self.sin, None, self.keys, j, kw)
        self.model.recurrence.step(1, self.state, h)


def pool_kv_bytes(engine, seq) -> dict:
    """Bytes per token a depth-K sequence holds in the paged pool: its units times a unit's bytes, over the
    tokens its blocks cover; and the tiers it holds beyond its depth's (prelude, K iterations, coda)."""
    cfg, bm = engine.model.config, engine.blocks
    unit = engine.kv.unit_bytes(cfg, bm.block_size, engine.kv.kv.dtype)
    measured = len(bm.units_of(seq)) * unit // (len(seq.blocks[0]) * bm.block_size)
    expected_tiers = (cfg.n_prelude > 0) + seq.loops * (cfg.n_core > 0) + (cfg.n_coda > 0)
    accounted = bm.units_per_block(seq.loops) * unit // bm.block_size
    return {"measured": measured, "accounted": accounted, "tiers_allocated_beyond_depth": len(seq.blocks) - expected_tiers}


def run(subject: Subject, batches=(1, 32), prompt_len: int = 32, rounds: int = 8, steps: int = 8, seed: int = 0,
        quiet: bool = False, device=None) -> dict:
    cfg = subject.config
    depths = list(range(1, cfg.max_loops + 1))
    schemes = {"mesh": subject, "base": base_twin(subject, seed)} if cfg.scheme != "base" else {"base": subject}
    total = rounds * steps
    benches, fixed = {}, {}
    for scheme, subj in schemes.items():
        for B in batches:
            for K in depths:
                fixed[(scheme, B, K)] = fb = FixedBatch(subj, [K] * B, prompt_len, total, seed)
                benches[f"{scheme}/B{B}/K{K}"] = fb.step
            benches[f"{scheme}/B{B}/core"] = CorePass(subj.model, B, prompt_len + total // 2)
    with tqdm(total=rounds, desc="cost per depth", disable=quiet, leave=False) as bar:
        times = interleave(benches, rounds, steps, device, bar)

    out = {"prompt_len": prompt_len, "steps_timed": total, "rounds": rounds, "depths": depths, "schemes": list(schemes), "rows": [], "fits": [], "kv": []}
    step_ms = {}
    for (scheme, B, K) in fixed:
        step_ms[(scheme, B, K)] = ms = 1e3 * median(times[f"{scheme}/B{B}/K{K}"])
        out["rows"].append({"scheme": scheme, "batch": B, "loops": K, "layers_applied": cfg.num_layer_applications(K),
                            "step_ms": ms, "ms_per_token": ms / B})
    for scheme in schemes:
        for B in batches:
            ys = [step_ms[(scheme, B, K)] / B for K in depths]
            fit = linear_fit(depths, ys)
            core = 1e3 * median(times[f"{scheme}/B{B}/core"]) / B
            out["fits"].append({"scheme": scheme, "batch": B, "a_ms": fit["a"], "b_ms": fit["b"], "r2": fit["r2"],
                                "core_pass_ms": core, "b_over_core_pass": fit["b"] / core})
    if "base" in schemes and "mesh" in schemes:
        # Paired within each round (the same load for both), then the median over rounds.
        def paired(B, K):
            return [m / b - 1.0 for m, b in zip(times[f"mesh/B{B}/K{K}"], times[f"base/B{B}/K{K}"])]

        out["mesh_overhead"] = [{"batch": B, "loops": K, "overhead": median(paired(B, K))} for B in batches for K in depths]
        out["mesh_overhead_all"] = median([x for B in batches for K in depths for x in paired(B, K)])
    first = next(iter(schemes))
    elem = next(subject.model.parameters()).element_size()
    for K in depths:
        fb = fixed[(first, batches[0], K)]
        kv = pool_kv_bytes(fb.engine, fb.seqs[0])
        kv.update(loops=K, layers=cfg.num_layer_applications(K),
                  formula=2 * cfg.num_layer_applications(K) * cfg.hidden_size * elem,
                  model=subject.model.kv_bytes_per_token(K))
        out["kv"].append(kv)
    return out
