"""float32 against bfloat16 on this CPU, for the weights (`--dtype`) and for the K/V pool alone
(`--kv-cache-dtype`): decode step time at batch 1 and 32, and the quality cost of the default model at
its default depth as held-out nats/char, two ways: full forwards (the weights' dtype; K/V never stored)
and through the engine's pool (prompt log-probabilities computed 8 tokens a step, so every query
attends over K/V read back from the pool in its dtype).

    python -m benchmarks.precision [--text ../shared/data/tinyshakespeare.txt] [--chars 60000] [--rounds 3]

One torch thread; the variants take turns in every round (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import DEFAULT_MODEL
from server import Engine, EngineConfig, SamplingParams

VARIANTS = {"float32": ("float32", "float32"), "float32 + bf16 K/V": ("float32", "bfloat16"), "bfloat16": ("bfloat16", "bfloat16")}
POOL_CHARS = 6000  # the pool measurement decodes 8 tokens a step: a tenth of the held-out text


def step_ms(engine: Engine, ids: list[int], batch: int, steps: int = 30) -> float:
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, detokenize=False)
    engine.add_request([ids] * batch, params)
    for _ in range(3):  # the prompt, then two warm decode steps
        engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    while engine.has_work():
        engine.step()
    return ms


@torch.inference_mode()
def nats_per_char(engine: Engine, text: str, window: int = 256, batch: int = 16) -> float:
    """Held-out nats/char at the model's default depth, non-overlapping windows, full forwards."""
    ids = engine.encode(text)
    n = (len(ids) - 1) // window
    x = torch.tensor(ids[: n * window + 1])
    nll = 0.0
    for i in range(0, n, batch):
        rows = range(i, min(n, i + batch))
        xs = torch.stack([x[j * window : (j + 1) * window] for j in rows])
        ys = torch.stack([x[j * window + 1 : (j + 1) * window + 1] for j in rows])
        lp = engine.model(xs, use_cache=False).logits.float().log_softmax(-1)
        nll -= float(lp.gather(-1, ys[..., None]).sum())
    return nll / len(engine.decode(ids[1 : n * window + 1]))


def pool_nats_per_char(engine: Engine, text: str, window: int = 255) -> float:
    """Held-out nats/char from prompt log-probabilities through the paged pool (the engine must take few
    tokens a step, so that chunks attend over stored K/V)."""
    ids = engine.encode(text)
    n = (len(ids) - 1) // window
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True, detokenize=False)
    seqs = engine.add_request([ids[i * window : (i + 1) * window] for i in range(n)], params)
    while engine.has_work():
        engine.step()
    nll = -sum(lp[0] for s in seqs for lp in s.prompt_logprobs[1:])
    return nll / len(engine.decode([t for i in range(n) for t in ids[i * window + 1 : (i + 1) * window]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--chars", type=int, default=60000, help="held-out characters (from the last 10%% of the text)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/precision.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not Path(args.text).is_file():
        print(f"python -m benchmarks.precision: error: no text at {args.text}", file=sys.stderr)
        return 2
    text = Path(args.text).read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9) :][: args.chars]
    engines = {name: Engine(EngineConfig(model=DEFAULT_MODEL, dtype=w, kv_cache_dtype=kv, max_batch_size=32), metrics=False)
               for name, (w, kv) in VARIANTS.items()}
    prompt = engines["float32"].encode(held_out[:400])[:32]
    names = list(VARIANTS)
    times = {(d, b): [] for d in names for b in (1, 32)}
    for r in range(args.rounds):
        for d in names if r % 2 == 0 else names[::-1]:
            for b in (1, 32):
                times[(d, b)].append(step_ms(engines[d], prompt, b))
    out = {"command": "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": []}
    for name, (w, kv) in VARIANTS.items():
        pool = Engine(EngineConfig(model=DEFAULT_MODEL, dtype=w, kv_cache_dtype=kv, max_num_batched_tokens=8,
                                   max_batch_size=8), metrics=False)
        out["rows"].append({"variant": name, "weights": w, "kv_cache": kv,
                            "nats_per_char_full_forward": nats_per_char(engines[name], held_out),
                            "nats_per_char_through_pool": pool_nats_per_char(pool, held_out[:POOL_CHARS]),
                            **{f"step_ms_b{b}": statistics.median(times[(name, b)]) for b in (1, 32)}})
    print(f"| weights | K/V pool | nats/char, full forwards ({args.chars} chars) | nats/char through the pool "
          f"({POOL_CHARS} chars) | decode step ms, batch 1 | batch 32 |\n|---|---|---:|---:|---:|---:|")
    for row in out["rows"]:
        print(f"| {row['weights']} | {row['kv_cache']} | {row['nats_per_char_full_forward']:.4f} | "
              f"{row['nats_per_char_through_pool']:.4f} | {row['step_ms_b1']:.2f} | {row['step_ms_b32']:.2f} |")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}  ({out['command']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
