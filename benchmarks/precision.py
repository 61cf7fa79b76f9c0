"""float32 against bfloat16 (weights and K/V, `--dtype`) on this CPU: decode step time at batch 1 and
32, and the quality cost as held-out nats/char of the default model at its default depth.

    python -m benchmarks.precision [--text ../shared/data/tinyshakespeare.txt] [--chars 60000] [--rounds 3]

One torch thread; the two dtypes take turns in every round (medians over rounds).
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

DTYPES = ("float32", "bfloat16")


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
    engines = {d: Engine(EngineConfig(model=DEFAULT_MODEL, dtype=d, max_batch_size=32), metrics=False) for d in DTYPES}
    prompt = engines["float32"].encode(held_out[:400])[:32]
    times = {(d, b): [] for d in DTYPES for b in (1, 32)}
    for r in range(args.rounds):
        for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            for b in (1, 32):
                times[(d, b)].append(step_ms(engines[d], prompt, b))
    out = {"command": "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": []}
    for d in DTYPES:
        out["rows"].append({"dtype": d, "nats_per_char": nats_per_char(engines[d], held_out),
                            **{f"step_ms_b{b}": statistics.median(times[(d, b)]) for b in (1, 32)}})
    print("| dtype | nats/char | decode step ms, batch 1 | batch 32 |\n|---|---:|---:|---:|")
    for row in out["rows"]:
        print(f"| {row['dtype']} | {row['nats_per_char']:.4f} | {row['step_ms_b1']:.2f} | {row['step_ms_b32']:.2f} |")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}  ({out['command']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
