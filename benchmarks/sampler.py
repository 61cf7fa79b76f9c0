"""Micro-benchmark: the engine's Sampler on one decode step of 32 rows over the default model's vocabulary.

    python -m benchmarks.sampler                    # one torch thread; prints ms per step for each row mix
    python -m benchmarks.sampler --rows 32 --threads 2 --steps 200

The logits are the default model's own, over a few lines of verse (so top-p sees a trained model's
distributions, not random ones). Each mix is timed as the median over blocks of steps (the machine
may be shared), with the rows' histories growing as in decoding so the penalties see real counts. "greedy" is the floor (an argmax);
the issue-12 target is a sampled step (temperature 0.8, top-p 0.95) within 10% of a whole decode step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from types import SimpleNamespace

import torch

from server.engine.sampler import Sampler, SamplingParams

MIXES = {
    "greedy": dict(temperature=0.0),
    "t0.8": dict(temperature=0.8),
    "t0.8 top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "t0.8 top-k 50 top-p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "t0.8 top-p 0.95 + penalties": dict(temperature=0.8, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3,
                                        repetition_penalty=1.2),
}


VERSE = """ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
"""


@torch.inference_mode()
def model_logits(rows: int, sets: int = 8) -> torch.Tensor:
    """(sets, rows, V): the default model's next-token logits at `sets * rows` positions of VERSE."""
    from model import DEFAULT_MODEL
    from server.engine.loading import load_checkpoint

    model, tok = load_checkpoint(DEFAULT_MODEL, torch.device("cpu"), torch.float32)
    ids = tok(VERSE).input_ids
    logits = model(torch.tensor([ids])).logits[0]  # (T, V) at the default depth
    pick = torch.linspace(4, len(ids) - 1, sets * rows).long()
    return logits[pick].reshape(sets, rows, -1)


def time_mix(params: SamplingParams, logits: torch.Tensor, steps: int, block: int = 10) -> float:
    """Median ms per sampler call over blocks of `block` steps."""
    rows, vocab = logits.shape[1:]
    ids = itertools.count()
    seqs = [SimpleNamespace(id=next(ids), params=SamplingParams(**{**params.__dict__, "seed": i}) if not params.greedy
                            else params, generator=None, prompt_ids=list(range(i, i + 16)), output_ids=[])
            for i in range(rows)]
    for s in seqs:
        s.generator = s.params.generator("cpu")
    sampler = Sampler(vocab, "cpu", eos_token_id=0)
    times = []
    with torch.inference_mode():
        for b in range(steps // block):
            t0 = time.perf_counter()
            for j in range(block):
                tokens, _ = sampler(seqs, logits[(b * block + j) % len(logits)])
                for s, t in zip(seqs, tokens):
                    s.output_ids.append(t)
            times.append((time.perf_counter() - t0) / block * 1e3)
    return statistics.median(times[1:] or times)  # the first block warms up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampler", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits = model_logits(args.rows)
    print(f"Sampler on the default model's logits, {args.rows} rows x vocab {logits.shape[-1]}, "
          f"{args.threads} thread(s), median of blocks of 10 steps")
    print("| rows' parameters | ms per step |")
    print("|---|---:|")
    for name, kw in MIXES.items():
        print(f"| {name} | {time_mix(SamplingParams(**kw), logits, args.steps):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
