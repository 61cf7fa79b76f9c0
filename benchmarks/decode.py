"""1. Decode speed against Hugging Face transformers, on identical weights.

A vanilla (non-recursive) model with the default model's dimensions and as many layers as the
default model applies at its default depth (N(K) = P + K*C + D), random weights, converted with
`model.convert.to_gpt_neox` so `GPTNeoXForCausalLM` runs exactly the same function. Both decode
greedily from the same prompts:

- ours: the server's engine (scheduler + depth-aware KV pool + model runner, no HTTP) via
  `Engine.generate`, token ids only (no detokenizing, as HF returns ids);
- HF: `GPTNeoXForCausalLM.generate()` with its default cache (DynamicCache), SDPA attention, float32.

Same thread count, warm-up excluded, repetitions interleaved (ABBA) so machine load hits both alike;
the speedup is the median of per-repetition ratios. Also timed (`KernelFloor`): the model's Linear
layers and one SDPA per layer at the run's mean context, alone, i.e. the fp32 work no engine can
skip; HF's step time over their sum bounds the speedup any engine could reach with the same kernels.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from model import MeshConfig, MeshForCausalLM
from model.convert import to_gpt_neox

from .common import greedy, make_engine, median, prompt_ids, random_model, sync


def vanilla_twin(config: MeshConfig, context: int, loops: int | None = None) -> MeshConfig:
    """A vanilla layout with the same dimensions and N(loops) layers (the same work per token as a call at
    that depth; default the model's default depth)."""
    layers = config.num_layer_applications(loops)
    return MeshConfig.from_layout(
        str(layers), hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size, hidden_act=config.hidden_act,
        rotary_pct=config.rotary_pct, rotary_emb_base=config.rotary_emb_base,
        use_parallel_residual=config.use_parallel_residual, layer_norm_eps=config.layer_norm_eps,
        max_position_embeddings=max(context, config.max_position_embeddings), eos_token_id=None, bos_token_id=None,
        pad_token_id=None,
    )


def hf_model(mesh: MeshForCausalLM):
    neox = to_gpt_neox(mesh).eval()
    neox.set_attn_implementation("sdpa")
    gc = neox.generation_config
    gc.eos_token_id, gc.bos_token_id, gc.pad_token_id = None, None, 0  # never stop early; pad id only silences a warning
    return neox


class KernelFloor:
    """The kernels one decode step cannot skip, timed alone: every Linear once on a (B, 1, in) input
    (the fp32 matrix products) and, per layer, SDPA of one query over S contiguous keys (S = the
    mean context of the run; a separate K/V per layer, as in any cache). No engine that keeps these
    kernels can make a step faster than their sum."""

    def __init__(self, model: torch.nn.Module, batch: int, keys: int):
        p = next(model.parameters())
        cfg = model.config
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.inputs = {n: torch.randn(batch, 1, n, device=p.device, dtype=p.dtype) for n in {m.in_features for m in self.linears}}
        shape = (batch, cfg.num_attention_heads, keys, cfg.head_size)
        self.q = torch.randn(batch, cfg.num_attention_heads, 1, cfg.head_size, device=p.device, dtype=p.dtype)
        self.kv = [(torch.randn(shape, device=p.device, dtype=p.dtype), torch.randn(shape, device=p.device, dtype=p.dtype))
                   for _ in range(cfg.num_layer_applications(cfg.default_loops))]

    @torch.inference_mode()
    def gemms(self) -> None:
        for m in self.linears:
            m(self.inputs[m.in_features])

    @torch.inference_mode()
    def attention(self) -> None:
        for k, v in self.kv:
            torch.nn.functional.scaled_dot_product_attention(self.q, k, v)


def run(subject, batches=(1, 32), prompt_len: int = 32, new_tokens: int = 256, reps: int = 5, warmup_tokens: int = 32,
        seed: int = 0, quiet: bool = False) -> dict:
    device = next(subject.model.parameters()).device
    dtype = next(subject.model.parameters()).dtype
    config = vanilla_twin(subject.config, prompt_len + new_tokens)
    mesh = random_model(config, seed, device, dtype)
    neox = hf_model(mesh)
    engine = make_engine(mesh, subject.tokenizer, max_batch_size=max(batches))
    out = {
        "model": {"layout": config.layout, "hidden_size": config.hidden_size, "heads": config.num_attention_heads,
                  "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
                  "parameters": mesh.num_parameters(), "dtype": str(dtype).replace("torch.", ""),
                  "hf_attention": neox.config._attn_implementation, "hf_cache": "DynamicCache (default)"},
        "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": reps, "rows": [],
    }

    for B in batches:
        prompts = prompt_ids(subject.tokenizer, B, prompt_len, config.vocab_size, seed + B)
        ids = torch.tensor(prompts, device=device)
        mask = torch.ones_like(ids)

        def ours(n=new_tokens):
            return [c.token_ids for c in engine.generate(prompts, greedy(n))]

        @torch.inference_mode()
        def hf(n=new_tokens):
            seqs = neox.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return seqs[:, prompt_len:].tolist()

        def timed(fn):
            sync(device)
            t0 = time.perf_counter()
            result = fn()
            sync(device)
            return time.perf_counter() - t0, result

        floor = KernelFloor(mesh, B, prompt_len + new_tokens // 2)
        ours(warmup_tokens), hf(warmup_tokens), floor.gemms(), floor.attention()  # warm-up: allocator, lazy init
        t_ours, t_hf, t_gemm, t_attn, same = [], [], [], [], None
        for r in tqdm(range(reps), desc=f"decode vs HF, batch {B}", disable=quiet, leave=False):
            order = (("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours))
            tokens = {}
            for name, fn in order:
                dt, tokens[name] = timed(fn)
                (t_ours if name == "ours" else t_hf).append(dt)
            if same is None:  # identical weights, greedy: the same tokens (float sums may differ in the last bits)
                same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"]))
            t_gemm.append(min(timed(floor.gemms)[0] for _ in range(5)))
            t_attn.append(min(timed(floor.attention)[0] for _ in range(5)))
        ratios = [h / o for h, o in zip(t_hf, t_ours)]
        hf_step = median(t_hf) / new_tokens
        out["rows"].append({
            "batch": B,
            "ours_s": t_ours, "hf_s": t_hf,
            "ours_tok_s": B * new_tokens / median(t_ours),
            "hf_tok_s": B * new_tokens / median(t_hf),
            "speedup": median(ratios),
            "speedup_of_medians": median(t_hf) / median(t_ours),
            "ours_ms_per_step": 1e3 * median(t_ours) / new_tokens,
            "hf_ms_per_step": 1e3 * hf_step,
            "gemm_floor_ms_per_step": 1e3 * median(t_gemm),
            "attention_floor_ms_per_step": 1e3 * median(t_attn),
            "max_speedup_same_kernels": hf_step / (median(t_gemm) + median(t_attn)),
            "greedy_rows_identical": f"{same}/{B}",
        })
    return out
