"""Self-speculation by depth continuation (issue 13): greedy rows of depth K draft g tokens at depth d
and one verify pass resumes iterations d..K-1 + the coda for them. Measured on the server's engine
(scheduler + paged K/V pool + model runner, no HTTP), greedy, one torch thread, every engine step timed:

1. Batch 1, default model, ~128 tokens from Shakespeare prompts: speculation on vs off at depth 4 and
   at the default depth 3 for every (d, g). Step costs (block means): a depth-K decode step (the plain
   blocks), a depth-d step (plain depth-d blocks), a draft step and a verify pass (the speculative
   block), each taken relative to the depth-K steps of the blocks either side, so that costs from
   different moments share no load; tokens per round from the counters. The bound a round could
   reach with those costs is
       tokens_per_round * cost(depth-K step) / (drafts_per_round * cost(depth-d step) + cost(verify))
   and the speedup is reported with its share of that bound. Also the acceptance rate per (K, d).
2. Concurrency: 32 rows of mixed depths 1..4 in one engine, tokens/s on vs off, with the engine's
   default --speculative-max-batch (rows stop drafting above it) and with every row drafting; and a
   sweep of the batch size (equal rows at depth 4, every row drafting) for the crossover.
3. Greedy tokens with speculation equal those without, every block (the run fails otherwise).
4. HF transformers generate() of the vanilla GPT-NeoX twin with as many layers as depth 4 applies
   (benchmarks/decode.py), batch 1, against our depth-4 decoding with and without speculation.

The machine is shared: every contender's block (one whole generation) lies between two blocks of its
baseline (plain decoding at the same depth), the order reversed every other round, and each figure is
the median over rounds of per-round ratios. Speedups are wall-clock; the same ratio in process CPU time
(one thread: time not spent waiting for a core) is printed beside it as a check on the load.

    python -m benchmarks.speculation                       # full run (2-4 min): docs/speculation.json
    python -m benchmarks.speculation --quick --out /tmp/spec-quick.json   # about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .common import (ROOT, SHAKESPEARE, greedy, load_average, load_subject, machine, make_engine, median,
                     prompt_ids, random_model)
from .decode import hf_model, vanilla_twin

COMMAND = "python -m benchmarks.speculation"
PLANS = {
    "full": dict(prompts=2, prompt_len=32, new_tokens=128, reps=5, depths=(4, 3), ds=(1, 2), gs=(2, 3, 4, 6, 8),
                 conc_rows=32, conc_tokens=32, conc_reps=6, batches=(1, 2, 4, 8, 16, 32), sweep_tokens=24, sweep_reps=3),
    "quick": dict(prompts=2, prompt_len=32, new_tokens=64, reps=2, depths=(4, 3), ds=(1, 2), gs=(3, 6),
                  conc_rows=32, conc_tokens=16, conc_reps=2, batches=(1, 2, 8, 32), sweep_tokens=12, sweep_reps=2),
    "tiny": dict(prompts=2, prompt_len=8, new_tokens=10, reps=1, depths=(4, 3), ds=(1, 2), gs=(3,),
                 conc_rows=4, conc_tokens=6, conc_reps=1, batches=(1, 4), sweep_tokens=6, sweep_reps=1),
}
TARGETS = {"speedup_depth4": 1.3, "speedup_default_depth": 1.2, "share_of_bound": 0.75, "concurrency_ratio": 0.95}


# ---- engines and timed generations -------------------------------------------------------------
def engines(subject, rows: int, seq_len: int, specs, max_batch: int | None = None, compile: str = "auto") -> dict:
    """{None: a plain engine, (d, g): a speculating one} with the same pool (make_engine's sizing) and no
    prefix caching: repeated prompts must cost every round the same. max_batch: the engine's
    --speculative-max-batch (None: its default, drafting only below the crossover); compile: --compile
    (graphs are shared: every engine runs the same model object at the same shapes)."""
    from server import Engine

    base = make_engine(subject.model, subject.tokenizer, max_batch_size=rows, seq_len=seq_len, compile=compile)
    out = {}
    for spec in (None, *specs):
        d, g = spec or (0, 1)
        cfg = dataclasses.replace(base.config, enable_prefix_caching=False, speculative_loops=d, num_speculative_tokens=g)
        if max_batch is not None:
            cfg = dataclasses.replace(cfg, speculative_max_batch=max_batch)
        out[spec] = Engine(cfg, model=subject.model, tokenizer=subject.tokenizer, metrics=False)
    return out


def step_kind(seqs, before) -> str:
    """What the step that just ran was: a prefill (some row had no token yet), a draft or verify step
    (batch 1: which counter moved), else a decode step."""
    if any(n_out == 0 for n_out, _, _ in before):
        return "prefill"
    if len(seqs) == 1:
        seq, (_, n_drafts, n_drafted) = seqs[0], before[0]
        if seq.num_drafted > n_drafted:
            return "verify"
        if len(seq.draft_ids) > n_drafts:
            return "draft"
    return "decode"


def timed_generate(engine, prompts: list[list[int]], depths: list[int], max_tokens: int) -> dict:
    """Greedy generation of every prompt at its depth, all at once, timing each engine step ->
    tokens, per-kind step times, decode seconds/tokens (steps after every row's first token) and the
    speculation counters summed over rows."""
    seqs = []
    for k in sorted(set(depths), reverse=True):
        seqs += engine.add_request([p for p, d in zip(prompts, depths) if d == k], greedy(max_tokens), loops=k)
    steps = {"prefill": [], "decode": [], "draft": [], "verify": []}
    decode_tokens, decode_cpu = 0, 0.0
    t_start = time.perf_counter()
    while engine.has_work():
        before = [(len(s.output_ids), len(s.draft_ids), s.num_drafted) for s in seqs]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = engine.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        kind = step_kind(seqs, before)
        steps[kind].append(dt)
        if kind != "prefill":
            decode_tokens += sum(len(o.token_ids) for o in outs)
            decode_cpu += dc
    total = time.perf_counter() - t_start
    counters = {c: sum(getattr(s, c) for s in seqs) for c in ("num_drafted", "num_accepted", "num_spec_emitted")}
    return {"tokens": [s.output_ids for s in seqs], "depths": [s.loops for s in seqs], "total_s": total,
            "decode_s": total - sum(steps["prefill"]), "decode_cpu_s": decode_cpu, "decode_tokens": decode_tokens,
            "steps": steps, **counters}


def per_token(run: dict, clock: str = "decode_s") -> float:
    """Seconds of wall time (clock="decode_s") or of process CPU time ("decode_cpu_s") per decode token."""
    return run[clock] / run["decode_tokens"]


def shakespeare_prompts(tokenizer, n: int, length: int, vocab_size: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out tail of tinyshakespeare (the last 10%, at evenly
    spaced line starts); the built-in lines (common.prompt_ids) when the file is not at hand."""
    if not SHAKESPEARE.is_file():
        return prompt_ids(tokenizer, n, length, vocab_size)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tail = text[int(0.9 * len(text)):]
    starts = [tail.index("\n", i * len(tail) // (n + 1)) + 1 for i in range(n)]
    return [[t for t in tokenizer(tail[s : s + 8 * length])["input_ids"] if t < vocab_size][:length] for s in starts]


def sandwiched(base, others: dict, rounds: int, bar=None) -> dict[str, list[tuple[dict, dict, dict]]]:
    """Blocks base, A, base, B, base, ... (the order of the others reversed every other round): each
    contender's block lies between two blocks of the baseline, so a load change on the shared machine
    hits the pair alike. Each callable takes the round number; every contender runs once first
    (warm-up, round -1, untimed). Returns name -> per round (base before, the block, base after)."""
    base(-1)
    for fn in others.values():
        fn(-1)
    out = {name: [] for name in others}
    before = base(0)
    for r in range(rounds):
        for name in (list(others) if r % 2 == 0 else list(reversed(others))):
            block = others[name](r)
            after = base(r)
            out[name].append((before, block, after))
            before = after
        if bar is not None:
            bar.update(1)
    return out


def speedup(pair: tuple[dict, dict, dict], clock: str = "decode_s") -> float:
    """The baseline's time per token (mean of its blocks either side) over the contender's."""
    before, block, after = pair
    return (per_token(before, clock) + per_token(after, clock)) / 2 / per_token(block, clock)


def step_ms(run: dict, kind: str) -> float:
    """Mean milliseconds of one step of this kind in a block. A block's mean, not its median: a single
    step of a few ms is either preempted or not, so the median of steps jumps between the two."""
    steps = run["steps"][kind]
    return 1e3 * sum(steps) / len(steps) if steps else float("nan")


def relative_cost(pair: tuple[dict, dict, dict], kind: str) -> float:
    """A step of `kind` in the middle block over a depth-K step of the baseline blocks either side."""
    before, block, after = pair
    return 2 * step_ms(block, kind) / (step_ms(before, "decode") + step_ms(after, "decode"))


# ---- 1. batch 1 ----------------------------------------------------------------------------------
def section_batch1(subject, plan: dict, prompts, quiet: bool) -> tuple[dict, dict]:
    """Per depth K: plain depth-K blocks sandwiching every (d, g) at K, plain depth-d blocks (the draft
    depth's step cost) and, at the deepest K, HF's twin. Round r decodes prompt r mod len(prompts)."""
    n, specs = plan["new_tokens"], [(d, g) for d in plan["ds"] for g in plan["gs"]]
    eng = engines(subject, 1, plan["prompt_len"] + n + 2, specs, compile=plan["compile"])
    for spec, engine in eng.items():  # every graph a batch-1 row needs, compiled before the timing
        graphs = engine.runner.compiled
        if graphs is not None:
            for k in {*plan["depths"], *plan["ds"]}:
                graphs.warm_up(k)
            for k in plan["depths"]:
                if spec is not None and spec[0] < k:
                    graphs.warm_up(k, (1,), t0=spec[0], T=spec[1])  # its verify passes
    neox = hf_twin(subject, plan["prompt_len"] + n, max(plan["depths"]))

    def block(engine, k):
        return lambda r: timed_generate(engine, [prompts[r % len(prompts)]], [k], 8 if r < 0 else n)

    rows, res_hf = [], None
    with tqdm(total=plan["reps"] * len(plan["depths"]), desc="batch 1", disable=quiet, leave=False) as bar:
        for k in plan["depths"]:
            others = {f"off@{d}": block(eng[None], d) for d in plan["ds"] if d < k}
            others.update({(d, g): block(eng[(d, g)], k) for d, g in specs if d < k})
            if k == max(plan["depths"]):
                others["hf"] = lambda r: hf_generate(neox, [prompts[r % len(prompts)]], 8 if r < 0 else n)
            res = sandwiched(block(eng[None], k), others, plan["reps"], bar)
            rows += [spec_row(res, k, d, g) for d, g in specs if d < k]
            if "hf" in res:
                res_hf = res
    ident = [row.pop("identical") for row in rows]
    identity = {"equal": sum(e for e, _ in ident), "rows": sum(t for _, t in ident)}
    return {"rows": rows, "identity": identity}, hf_summary(res_hf, rows, max(plan["depths"]))


def spec_row(res: dict, k: int, d: int, g: int) -> dict:
    """Speedup (wall and CPU time), step costs, bound and acceptance of (K, d, g): per round, then medians."""
    per = []
    for pair, plain_d in zip(res[(d, g)], res[f"off@{d}"]):
        (b0, on, b1), rounds = pair, len(pair[1]["steps"]["verify"])
        cost_k = (step_ms(b0, "decode") + step_ms(b1, "decode")) / 2
        # every cost relative to the depth-K steps around it, so the bound mixes no two moments' loads
        r_d, r_draft, r_verify = relative_cost(plain_d, "decode"), relative_cost(pair, "draft"), relative_cost(pair, "verify")
        tpr, dpr = on["num_spec_emitted"] / rounds, on["num_drafted"] / rounds
        bound = tpr / (dpr * r_d + r_verify)
        x = speedup(pair)
        per.append(dict(speedup=x, speedup_cpu=speedup(pair, "decode_cpu_s"), bound=bound, share=x / bound,
                        cost_k=cost_k, cost_d=r_d * cost_k, cost_draft=r_draft * cost_k, cost_verify=r_verify * cost_k,
                        tpr=tpr, bound_draft=tpr / (dpr * r_draft + r_verify)))
    m = {key: median([p[key] for p in per]) for key in per[0]}
    runs = [on for _, on, _ in res[(d, g)]]
    drafted, accepted = sum(r["num_drafted"] for r in runs), sum(r["num_accepted"] for r in runs)
    same = sum(on["tokens"] == after["tokens"] for _, on, after in res[(d, g)])  # same round: the same prompt
    return {"loops": k, "d": d, "g": g, "speedup": m["speedup"], "speedup_cpu_time": m["speedup_cpu"], "bound": m["bound"],
            "share_of_bound": m["share"], "bound_with_draft_steps": m["bound_draft"], "tokens_per_round": m["tpr"],
            "ms_depth_k_step": m["cost_k"], "ms_depth_d_step": m["cost_d"], "ms_draft_step": m["cost_draft"],
            "ms_verify": m["cost_verify"], "acceptance": accepted / drafted, "drafted": drafted, "accepted": accepted,
            "emitted_by_verify": sum(r["num_spec_emitted"] for r in runs), "speedups": [p["speedup"] for p in per],
            "identical": (same, len(runs))}


def acceptance_by_depths(rows: list[dict]) -> list[dict]:
    """Drafts accepted / drafted per (K, d), pooled over g."""
    out = []
    for k, d in dict.fromkeys((r["loops"], r["d"]) for r in rows):
        sel = [r for r in rows if (r["loops"], r["d"]) == (k, d)]
        out.append({"loops": k, "d": d, "acceptance": sum(r["accepted"] for r in sel) / sum(r["drafted"] for r in sel)})
    return out


# ---- 4. HF generate() of the vanilla twin -------------------------------------------------------
def hf_twin(subject, context: int, loops: int):
    """HF's GPTNeoXForCausalLM with as many layers as `loops` applies and the default model's dimensions,
    random weights: decode.py's twin (whose benchmark checks our engine gives HF's tokens on it)."""
    return hf_model(random_model(vanilla_twin(subject.config, context, loops), 0))


@torch.inference_mode()
def hf_generate(neox, prompts, n: int) -> dict:
    """generate() of n tokens per prompt, timed whole (prefill included): `decode_s` is its total."""
    t0, tokens = time.perf_counter(), []
    for p in prompts:
        ids = torch.tensor([p])
        seq = neox.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tokens.append(seq[0, len(p):].tolist())
    return {"tokens": tokens, "decode_s": time.perf_counter() - t0, "decode_tokens": n * len(prompts)}


def hf_summary(res: dict, rows: list[dict], k: int) -> dict:
    """HF's time per token over ours at depth k: plain (HF's blocks sandwiched by ours), and with the best
    (d, g): that ratio times the speculative speedup. Ours excludes the prefill step, HF includes it
    (generate() times it whole): a 32-token prefill is about one step of 129."""
    best = max((r for r in rows if r["loops"] == k), key=lambda r: r["speedup"])
    plain = median([1 / speedup(pair) for pair in res["hf"]])
    return {"loops": k, "d": best["d"], "g": best["g"], "ratio_plain": plain, "ratio_speculative": plain * best["speedup"]}


# ---- 2. concurrency ------------------------------------------------------------------------------
def on_off(subject, depths: list[int], spec, shape: dict, variants: dict, bar=None) -> dict:
    """One row per depth in one engine (shape: tokens, reps, prompt_len), speculation off sandwiching each
    variant (name -> --speculative-max-batch, None for the engine's default) of speculation on with
    spec = (d, g) -> decode tokens/s and ratios."""
    rows, tokens, reps, prompt_len = len(depths), shape["tokens"], shape["reps"], shape["prompt_len"]
    seq_len = prompt_len + tokens + 2
    eng = {name: engines(subject, rows, seq_len, [spec], mb)[spec] for name, mb in variants.items()}
    off = engines(subject, rows, seq_len, [])[None]
    prompts = prompt_ids(subject.tokenizer, rows, prompt_len, subject.config.vocab_size)

    def block(engine):
        return lambda r: timed_generate(engine, prompts, depths, 4 if r < 0 else tokens)

    res = sandwiched(block(off), {name: block(e) for name, e in eng.items()}, reps, bar)
    out = {"rows": rows, "d": spec[0], "g": spec[1], "tok_s_off": median([1 / per_token(p[2]) for p in res[next(iter(res))]])}
    for name, pairs in res.items():
        on = [p[1] for p in pairs]
        out[name] = {"max_batch": variants[name], "tok_s": median([1 / per_token(r) for r in on]),
                     "ratio": median([speedup(p) for p in pairs]), "ratios": [speedup(p) for p in pairs],
                     "ratio_cpu_time": median([speedup(p, "decode_cpu_s") for p in pairs]),
                     "identical_rows": sum(a == b for a, b in zip(on[0]["tokens"], pairs[0][2]["tokens"])),
                     "drafted": sum(r["num_drafted"] for r in on),
                     "acceptance": sum(r["num_accepted"] for r in on) / max(1, sum(r["num_drafted"] for r in on))}
    return out


def section_concurrency(subject, plan: dict, spec, quiet: bool) -> dict:
    """32 rows of depths 1..4 (a quarter each) with the engine's default --speculative-max-batch and with
    every row drafting; then the batch-size sweep at depth 4, every row drafting, for the crossover."""
    n, kmax = plan["conc_rows"], subject.config.max_loops
    with tqdm(total=plan["conc_reps"] + plan["sweep_reps"] * len(plan["batches"]), desc="concurrency", disable=quiet,
              leave=False) as bar:
        shape = dict(tokens=plan["conc_tokens"], reps=plan["conc_reps"], prompt_len=plan["prompt_len"])
        mixed = on_off(subject, [1 + i % kmax for i in range(n)], spec, shape, {"default": None, "always": n}, bar)
        shape = dict(tokens=plan["sweep_tokens"], reps=plan["sweep_reps"], prompt_len=plan["prompt_len"])
        sweep = [on_off(subject, [kmax] * b, spec, shape, {"always": b}, bar) for b in plan["batches"]]
    mixed["depths"] = f"1..{kmax}, {n // kmax} rows each"
    losing = [r["rows"] for r in sweep if r["always"]["ratio"] < 1.0]
    return {"mixed": mixed, "sweep_loops": kmax, "sweep": sweep, "crossover_rows": losing[0] if losing else None}


# ---- the run -------------------------------------------------------------------------------------
def best_spec(rows: list[dict]):
    """The (d, g) with the best geometric-mean speedup over the depths measured."""
    score = {}
    for r in rows:
        score.setdefault((r["d"], r["g"]), []).append(r["speedup"])
    full = {s: v for s, v in score.items() if len(v) == max(map(len, score.values()))}
    return max(full, key=lambda s: torch.tensor(full[s]).log().mean().item())


def targets(out: dict) -> list[dict]:
    """Each target: what it is, its value, the bar, whether it is met."""
    rows, default = out["batch1"]["rows"], out["default_loops"]
    def best(k):
        return max((r for r in rows if r["loops"] == k), key=lambda r: r["speedup"], default=None)
    kmax, b_def = best(max(out["plan"]["depths"])), best(default)
    t = []
    if kmax:
        t.append(("speedup at depth %d, batch 1 (d=%d, g=%d)" % (kmax["loops"], kmax["d"], kmax["g"]), kmax["speedup"],
                  ">= %.1fx" % TARGETS["speedup_depth4"], kmax["speedup"] >= TARGETS["speedup_depth4"]))
        t.append(("share of the bound at depth %d (bound %.2fx)" % (kmax["loops"], kmax["bound"]), kmax["share_of_bound"],
                  ">= 75%", kmax["share_of_bound"] >= TARGETS["share_of_bound"]))
    if b_def and b_def is not kmax:
        t.append(("speedup at the default depth %d, batch 1 (d=%d, g=%d)" % (default, b_def["d"], b_def["g"]),
                  b_def["speedup"], ">= %.1fx" % TARGETS["speedup_default_depth"],
                  b_def["speedup"] >= TARGETS["speedup_default_depth"]))
        t.append(("share of the bound at depth %d (bound %.2fx)" % (default, b_def["bound"]), b_def["share_of_bound"],
                  ">= 75%", b_def["share_of_bound"] >= TARGETS["share_of_bound"]))
    c = out["concurrency"]["mixed"]
    t.append(("tokens/s on / off, %d rows of mixed depths (default --speculative-max-batch)" % c["rows"],
              c["default"]["ratio"], ">= 0.95", c["default"]["ratio"] >= TARGETS["concurrency_ratio"]))
    ident = out["batch1"]["identity"]
    t.append(("greedy rows identical, on vs off (batch 1)", ident["equal"] / ident["rows"], "= 1",
              ident["equal"] == ident["rows"]))
    h = out["hf"]
    t.append(("HF generate() time / ours, depth %d, batch 1 (d=%d, g=%d)" % (h["loops"], h["d"], h["g"]),
              h["ratio_speculative"], ">= 2x after 'Decode speed'", None))
    return [dict(target=a, value=v, bar=b, met=m) for a, v, b, m in t]


def report(out: dict) -> str:
    lines = [f"self-speculation ({out['model']}), load average {out['machine']['load_average_1_5_15']} -> "
             f"{out['load_average_end']}, {out['machine']['torch_threads']} torch thread(s); command: {out['command']}", "",
             "batch 1: K d g  speedup (cpu)  bound  share  tok/round  ms: K-step d-step draft verify  acceptance"]
    for r in out["batch1"]["rows"]:
        lines.append(f"         {r['loops']} {r['d']} {r['g']}  {r['speedup']:6.2f}x ({r['speedup_cpu_time']:4.2f}) {r['bound']:5.2f}x {100 * r['share_of_bound']:5.0f}%"
                     f"  {r['tokens_per_round']:8.2f}     {r['ms_depth_k_step']:6.2f} {r['ms_depth_d_step']:6.2f}"
                     f" {r['ms_draft_step']:5.2f} {r['ms_verify']:6.2f}  {100 * r['acceptance']:8.1f}%")
    lines.append("acceptance per (K, d): " + ", ".join(f"K={a['loops']} d={a['d']}: {100 * a['acceptance']:.1f}%"
                                                     for a in out["batch1"]["acceptance"]))
    c = out["concurrency"]
    lines.append(f"concurrency (d={c['mixed']['d']}, g={c['mixed']['g']}): rows  drafting  tok/s off  tok/s on  on/off (cpu)")
    for r in [c["mixed"], *c["sweep"]]:
        what = "mixed" if r is c["mixed"] else f"K={c['sweep_loops']}"
        for name in ("default", "always"):
            if name in r:
                v = r[name]
                lines.append(f"  {what:>6} {r['rows']:4d}  {name:>8} {r['tok_s_off']:9.1f} {v['tok_s']:9.1f} "
                             f"{v['ratio']:7.2f} ({v['ratio_cpu_time']:4.2f})")
    lines.append(f"crossover (first batch where drafting loses): {c['crossover_rows']}")
    h = out["hf"]
    lines.append(f"HF generate() / ours at depth {h['loops']}: {h['ratio_plain']:.2f}x plain, {h['ratio_speculative']:.2f}x speculative")
    lines += ["", "targets:"]
    for t in out["targets"]:
        mark = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['target']}: {t['value']:.3f} (target {t['bar']}) {mark}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer configurations, tokens and rounds (under a minute)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model, a few tokens: checks the machinery (tests)")
    p.add_argument("--out", type=Path, default=None, help="the JSON to write (default docs/speculation.json for a full run)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="the engines' --compile (on: batch-1 decode steps, drafts and verify passes run as "
                        "compiled graphs)")
    return p


def source_version() -> str:
    """The commit measured, "+dirty" when server/ or model/ have uncommitted changes (the tree is shared)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "server", "model"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def run(plan_name: str, quiet: bool = False, compile: str = "auto") -> dict:
    plan = dict(PLANS[plan_name], compile=compile)
    subject = load_subject(tiny=plan_name == "tiny")
    cfg = subject.config
    plan = dict(plan, depths=tuple(k for k in plan["depths"] if k <= cfg.max_loops))
    out = {"command": COMMAND + {"full": "", "quick": " --quick", "tiny": " --tiny"}[plan_name]
           + ("" if compile == "auto" else f" --compile {compile}"), "model": subject.source,
           "default_loops": cfg.default_loops, "plan": plan, "machine": machine("cpu"), "source": source_version()}
    prompts = shakespeare_prompts(subject.tokenizer, plan["prompts"], plan["prompt_len"], cfg.vocab_size)
    out["batch1"], out["hf"] = section_batch1(subject, plan, prompts, quiet)
    out["batch1"]["acceptance"] = acceptance_by_depths(out["batch1"]["rows"])
    out["concurrency"] = section_concurrency(subject, plan, best_spec(out["batch1"]["rows"]), quiet)
    out["load_average_end"] = load_average()
    out["targets"] = targets(out)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = "tiny" if args.tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    out = run(plan, args.quiet, args.compile)
    out["wall_s"] = time.perf_counter() - t0
    print(report(out))
    path = args.out or (Path("docs/speculation.json") if plan == "full" else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path} ({out['wall_s']:.0f} s)")
    ident = out["batch1"]["identity"]
    if ident["equal"] != ident["rows"]:
        print(f"error: speculative greedy tokens differ from plain decoding in {ident['rows'] - ident['equal']} of "
              f"{ident['rows']} generations (see batch1.rows[].identical in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
