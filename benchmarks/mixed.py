"""3. Mixed-depth batching: do depth-1 rows pay for a depth-4 neighbour's iterations?

Five engines, each holding a fixed running batch after a 32-token prompt, decode steps timed
round-robin (so machine load hits them alike):

    mixed     16 rows of depth max_loops + 16 rows of depth 1 (one step)
    deep32    32 rows of depth max_loops
    shallow32 32 rows of depth 1
    deep16    16 rows of depth max_loops
    shallow16 16 rows of depth 1

The cost predicted from active rows is what the mixed step must do at least: prelude + first core
iteration + coda (+ head, sampling, step overhead) at 32 rows, which is `shallow32`, plus core
iterations 2..max_loops at 16 rows, which is `deep16 - shallow16`. Target: mixed <= 1.15 x predicted
(ratio of the medians over rounds; the median of per-round ratios is reported alongside).
Running the two groups separately costs `deep16 + shallow16` (two steps).

Admission: at a fixed KV budget, how many requests (prompt + max_tokens tokens each) the scheduler
admits at each depth, and for an even mix, against budget / (kv_bytes_per_token(K) * tokens).
"""

from __future__ import annotations

from tqdm import tqdm

from server.engine.block_manager import BlockManager
from server.engine.kv_cache import PagedKVCache
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence

from .common import FixedBatch, Subject, greedy, interleave, median


def run(subject: Subject, rows: int = 32, prompt_len: int = 32, rounds: int = 8, steps: int = 8, seed: int = 0,
        quiet: bool = False, device=None, budget_mb: float = 64.0, request_tokens: tuple = (32, 256)) -> dict:
    deep, half = subject.config.max_loops, rows // 2
    total = rounds * steps
    layouts = {
        "mixed": [deep] * half + [1] * half,
        "deep32": [deep] * rows,
        "shallow32": [1] * rows,
        "deep16": [deep] * half,
        "shallow16": [1] * half,
    }
    fixed = {name: FixedBatch(subject, depths, prompt_len, total, seed) for name, depths in layouts.items()}
    with tqdm(total=rounds, desc="mixed-depth batching", disable=quiet, leave=False) as bar:
        times = interleave({name: fb.step for name, fb in fixed.items()}, rounds, steps, device, bar)
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    predicted = ms["shallow32"] + ms["deep16"] - ms["shallow16"]
    # Also per round (all five batches timed under the same load), then the median: a check on the
    # headline ratio of medians (a near-zero denominator makes single rounds of a tiny model meaningless).
    per_round = [m / (s32 + d16 - s16) for m, s32, d16, s16 in
                 zip(times["mixed"], times["shallow32"], times["deep16"], times["shallow16"])]
    out = {
        "rows": rows, "deep": deep, "prompt_len": prompt_len, "steps_timed": total, "rounds": rounds,
        "step_ms": ms,
        "predicted_ms": predicted,
        "separately_ms": ms["deep16"] + ms["shallow16"],
        "cost_ratio": ms["mixed"] / predicted,
        "cost_ratio_per_round_median": median(per_round),
        "mixed_over_deep32": ms["mixed"] / ms["deep32"],
        "mixed_over_separately": ms["mixed"] / (ms["deep16"] + ms["shallow16"]),
    }
    out["admission"] = admission(subject, budget_mb, *request_tokens)
    return out


def admission(subject: Subject, budget_mb: float, prompt_len: int, max_tokens: int, offered: int = 4096) -> dict:
    """Requests the scheduler admits in one step from a `budget_mb` K/V pool (no row limit), per depth and
    for an even mix of all depths, next to how many prompt + max_tokens reservations the same bytes would
    hold (what admission did before the paged pool). The server's own Scheduler and BlockManager; no
    forward pass runs."""
    cfg = subject.config
    p = next(subject.model.parameters())
    bs = 16
    unit = PagedKVCache.unit_bytes(cfg, bs, p.dtype)
    num_units = int(budget_mb * 2**20) // unit
    params = greedy(max_tokens)
    ids = [1] * prompt_len
    rows = []
    mixes = [[k] for k in range(1, cfg.max_loops + 1)] + [list(range(cfg.max_loops, 0, -1))]
    for depths in mixes:
        blocks = BlockManager(cfg, num_units, bs, prompt_len + max_tokens, enable_prefix_caching=False)
        sched = Scheduler(blocks, max_num_batched_tokens=offered * prompt_len, max_num_seqs=offered)
        for i in range(offered):  # distinct prompts: no block is shared
            sched.add(Sequence([i] + ids[1:], params, depths[i % len(depths)]))
        sched.schedule()  # admits first come, first served while blocks for the prompts are free
        per_request = sum(cfg.num_layer_applications(k) for k in depths) / len(depths) * unit / bs * (prompt_len + max_tokens)
        rows.append({
            "loops": depths[0] if len(depths) == 1 else "mix " + "/".join(map(str, sorted(depths))),
            "kv_bytes_per_token": cfg.num_layer_applications(depths[0]) * unit // bs if len(depths) == 1 else None,
            "admitted": len(sched.running),
            "budget_over_request_bytes": num_units * unit / per_request,
        })
    return {"budget_mb": budget_mb, "prompt_len": prompt_len, "max_tokens": max_tokens, "rows": rows}
