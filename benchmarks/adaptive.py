"""Adaptive depth (`loops: "auto"`) against fixed depths: quality against mean core iterations per
token, and time per token, through the engine's own decode path.

    python -m benchmarks.adaptive [--quick] [--text ../shared/data/tinyshakespeare.txt] [--chains model/chains]

- Text (the default model): held-out text is fed token by token as decode steps (teacher forcing
  through `ModelRunner.decode`, so every token takes the engine's exit decision and the K/V filling
  of skipped iterations); nats per character of the true next tokens, mean core iterations per token,
  at fixed depths 1..max and for each exit criterion (change of h, confidence, KL) at several thresholds.
- Chains (a model trained by `make train-chains`, if present): accuracy by hop count on held-out
  problems, one greedy answer token per problem through `Engine.generate` (with "auto" the answer
  token decides its own depth), with mean iterations and ms per answer at batch 1.

Writes JSON (--out) and prints a table per part with the command. Timing is on a shared machine: one
torch thread, medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import DEFAULT_MODEL
from server import Engine, EngineConfig, SamplingParams
from server.engine import AutoDepth
from server.engine.sequence import Sequence

THRESHOLDS = (0.02, 0.05, 0.1, 0.2)  # relative change of h
KL_THRESHOLDS = (1e-4, 5e-4, 2e-3, 1e-2)
CONFIDENCES = (0.7, 0.9, 0.95, 0.99)  # largest next-token probability


def auto_settings() -> list[tuple[str, AutoDepth]]:
    """(name, loops) of every "auto" setting the benchmark runs: each criterion at each of its thresholds."""
    pairs = [("change", t) for t in THRESHOLDS] + [("confidence", p) for p in CONFIDENCES] + [("kl", k) for k in KL_THRESHOLDS]
    return [(f"auto {c} {t:g}", AutoDepth(min_loops=1, exit_criterion=c, exit_threshold=t)) for c, t in pairs]


def forced_decode(engine: Engine, windows: list[list[int]], loops) -> dict:
    """Teacher-forced decode of each window (rows run together): the summed NLL of every next token, the
    core iterations spent, and the tokens scored."""
    auto = loops if isinstance(loops, AutoDepth) else None
    depth = engine.check_depth(loops)
    if auto is not None and auto.max_loops is None:
        auto = dataclasses.replace(auto, max_loops=depth)
    rows = [Sequence(ids, SamplingParams(max_tokens=1), depth, auto=auto) for ids in windows]  # one depth: any order
    nll, iters, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(len(windows[0]) - 1):
            for s in rows:
                s.num_computed = i
                if not engine.blocks.allocate(s, 1):
                    raise RuntimeError("the pool is too small for the windows")
            logits = engine.runner.decode(rows)
            order = rows
            lp = logits.float().log_softmax(-1)
            targets = torch.tensor([s.token_ids[i + 1] for s in order])
            nll -= float(lp.gather(1, targets[:, None]).sum())
            iters += sum(s.last_exit for s in order)
            count += len(order)
    for s in rows:
        engine.blocks.free(s)
    return {"nll": nll, "iterations": iters, "tokens": count}


def text_part(model_dir: Path, text: str, windows: int, length: int) -> list[dict]:
    engine = Engine(EngineConfig(model=model_dir, max_batch_size=windows, kv_cache_mb=256), metrics=False)
    ids = engine.encode(text[-(len(text) // 10):])  # the last tenth: the default model's validation split
    step = max(length, (len(ids) - length) // windows)
    chunks = [ids[i * step : i * step + length] for i in range(windows)]
    chars_per_token = sum(len(engine.decode(c[1:])) for c in chunks) / sum(len(c) - 1 for c in chunks)
    settings = [(f"loops={k}", k) for k in range(1, engine.model.config.max_loops + 1)]
    settings += auto_settings()
    out = []
    for name, loops in settings:
        t0 = time.perf_counter()
        r = forced_decode(engine, chunks, loops)
        dt = time.perf_counter() - t0
        out.append({"setting": name, "nats_per_char": r["nll"] / r["tokens"] / chars_per_token,
                    "mean_loops": r["iterations"] / r["tokens"], "ms_per_token": 1e3 * dt / r["tokens"]})
    times = generate_latency(engine, chunks[0][:16], [loops for _, loops in settings])
    for row, t in zip(out, times):
        row["ms_per_token_b1"] = t
    return out


def generate_latency(engine: Engine, prompt: list[int], settings: list, tokens: int = 64, rounds: int = 6) -> list[float]:
    """Median ms per generated token of one greedy request alone (batch 1), per setting; the settings take
    turns in every round (order reversed every other round) so load changes hit them alike."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    times = [[] for _ in settings]
    for r in range(rounds):
        order = list(range(len(settings)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            t0 = time.perf_counter()
            engine.generate([prompt], params, loops=settings[i])
            times[i].append(1e3 * (time.perf_counter() - t0) / tokens)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def criteria_part(model_dir: Path, text: str, length: int = 256) -> list[dict]:
    """The two exit criteria side by side, teacher-forced over one held-out window with the full forward
    (no K/V filling: an upper bound on what each criterion keeps): after each core iteration t, the
    relative change of h and the KL between the next-token distributions of iterations t and t-1 (which
    needs the coda and the head at every iteration). For each criterion and threshold: the mean exit
    iteration, nats/char at exit, and the layer applications spent per token, the KL check's extra codas
    and heads included (counted as D layers + 1 head, a head costing about one layer here)."""
    engine = Engine(EngineConfig(model=model_dir), metrics=False)
    m, cfg = engine.model, engine.model.config
    ids = engine.encode(text[-(len(text) // 10):])[: length + 1]
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    chars_per_token = len(engine.decode(ids[1:])) / len(y)
    ctx = m.layer_context(torch.arange(len(ids) - 1)[None], loops=cfg.max_loops)
    state, lps, rel = m.start(m.embed(x), ctx), [], []
    for t in range(cfg.max_loops):
        prev = state["h"]
        state = m.iterate(state, t, t + 1, ctx)
        rel.append(((state["h"] - prev).norm(dim=-1) / prev.norm(dim=-1))[0])  # (T,)
        lps.append(m.compute_logits(m.finish(state, ctx))[0].float().log_softmax(-1))  # (T, V)
    kl = [None] + [(lps[t].exp() * (lps[t] - lps[t - 1])).sum(-1) for t in range(1, cfg.max_loops)]
    nll = torch.stack([-lp.gather(1, y[:, None])[:, 0] for lp in lps])  # (K, T)
    out = []
    for crit, values, thresholds in (("relative change", rel, THRESHOLDS), ("KL", kl, KL_THRESHOLDS)):
        for thr in thresholds:
            exit_ = torch.full((len(y),), cfg.max_loops)
            for t in range(cfg.max_loops - 1, 0 if crit == "KL" else -1, -1):  # the first t whose check passes
                exit_ = torch.where(values[t] < thr, torch.tensor(t + 1), exit_)
            e = exit_.float()
            checks = cfg.n_coda + 1 if crit == "KL" else 0
            layers = cfg.n_prelude + e * cfg.n_core + cfg.n_coda + e * checks
            picked = nll.gather(0, (exit_ - 1)[None])[0]
            out.append({"criterion": crit, "threshold": thr, "mean_exit": float(e.mean()),
                        "nats_per_char": float(picked.mean()) / chars_per_token, "layers_per_token": float(layers.mean())})
    for k in range(1, cfg.max_loops + 1):
        out.append({"criterion": "fixed", "threshold": None, "mean_exit": float(k),
                    "nats_per_char": float(nll[k - 1].mean()) / chars_per_token,
                    "layers_per_token": float(cfg.num_layer_applications(k))})
    return out


def print_criteria(rows: list[dict]) -> None:
    print("| criterion | threshold | mean exit iteration | nats/char | layer applications/token |\n|---|---:|---:|---:|---:|")
    for r in rows:
        thr = "" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"| {r['criterion']} | {thr} | {r['mean_exit']:.2f} | {r['nats_per_char']:.4f} | {r['layers_per_token']:.2f} |")


def chains_part(model_dir: Path, n: int, hops: list[int], max_offset: int = 9) -> list[dict]:
    """Accuracy by hop count at each fixed depth and each exit criterion and threshold, the mean core
    iterations of the answer token, and the mean ms of the step that computes it (batch 1). Every setting runs as an
    "auto" row (a fixed depth k is min_loops = max_loops = k): the prompt but its last token is prefilled at
    max_loops and the answer comes from a one-token step, so the answer steps compare like for like."""
    from training.tasks.chains import eval_problems

    engine = Engine(EngineConfig(model=model_dir, max_batch_size=64), metrics=False)
    cfg = engine.model.config
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    settings = [(f"loops={k}", AutoDepth(min_loops=k, max_loops=k, exit_threshold=0.0)) for k in range(1, cfg.max_loops + 1)]
    settings += auto_settings()
    problems = {h: eval_problems("test", 0, h, n, max_offset) for h in hops}
    out = []
    for name, loops in settings:
        row = {"setting": name, "accuracy": {}, "iterations": 0, "answers": 0}
        for h, probs in problems.items():
            seqs = engine.add_request([engine.encode(p.prompt()) for p in probs], params, loops=loops)
            while engine.has_work():
                engine.step()
            right = sum(engine.decode(s.output_ids)[:1] == str(p.values[p.target]) for s, p in zip(seqs, probs))
            row["accuracy"][h] = right / len(probs)
            row["iterations"] += sum(s.loop_steps for s in seqs)
            row["answers"] += len(seqs)
        row["mean_accuracy"] = statistics.mean(row["accuracy"].values())
        row["mean_loops"] = row["iterations"] / row["answers"]
        out.append(row)
    mix = [p for h in hops for p in problems[h][:3]]  # every hop count, batch 1
    times = {name: [[] for _ in mix] for name, _ in settings}
    for _ in range(3):  # settings interleaved problem by problem: the machine's load hits them alike
        for i, p in enumerate(mix):
            for name, loops in settings:
                times[name][i].append(answer_step_ms(engine, p.prompt(), params, loops))
    for row in out:  # per problem the median of the rounds (noise), then the mean (an auto row's cost varies by problem)
        row["ms_per_answer_step_b1"] = statistics.mean(statistics.median(t) for t in times[row["setting"]])
    return out


def answer_step_ms(engine: Engine, prompt: str, params: SamplingParams, loops) -> float:
    """ms of the step that computes the answer token (the prompt's last token) of one problem, batch 1."""
    (seq,) = engine.add_request([engine.encode(prompt)], params, loops=loops)
    while not seq.output_ids:
        t0 = time.perf_counter()
        engine.step()
    ms = 1e3 * (time.perf_counter() - t0)  # the step that gave the answer
    while engine.has_work():
        engine.step()
    return ms


def chains_targets(rows: list[dict]) -> dict:
    """Issue 13's "auto" target on the chains model, per threshold: within 2 points of the deepest fixed
    depth's accuracy (mean over hop counts) at <= 60% of its answer-step ms, and more accurate than the
    fixed depth with the nearest mean cost."""
    fixed = [r for r in rows if r["setting"].startswith("loops=")]
    deepest = fixed[-1]
    out = {}
    for r in (r for r in rows if r["setting"].startswith("auto")):
        same_cost = min(fixed, key=lambda f: abs(f["mean_loops"] - r["mean_loops"]))
        gap = round(100 * (deepest["mean_accuracy"] - r["mean_accuracy"]), 2)
        ratio = round(r["ms_per_answer_step_b1"] / deepest["ms_per_answer_step_b1"], 3)
        beats = r["mean_accuracy"] > same_cost["mean_accuracy"]
        out[r["setting"]] = {"accuracy_gap_points": gap, "ms_ratio": ratio, "same_cost_fixed": same_cost["setting"],
                             "beats_same_cost": beats, "met": gap <= 2 and ratio <= 0.6 and beats}
    return out


def print_text(rows: list[dict]) -> None:
    print("| setting | nats/char | mean loops/token | ms/token (16 rows, forced) | ms/token (batch 1, generate) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['nats_per_char']:.4f} | {r['mean_loops']:.2f} | {r['ms_per_token']:.2f} | "
              f"{r['ms_per_token_b1']:.2f} |")


def print_chains(rows: list[dict], hops: list[int]) -> None:
    print("| setting | " + " | ".join(f"{h} hops" for h in hops) + " | mean | mean loops | ms/answer step (b1) |")
    print("|---|" + "---:|" * (len(hops) + 3))
    for r in rows:
        accs = " | ".join(f"{100 * r['accuracy'][h]:.0f}%" for h in hops)
        print(f"| {r['setting']} | {accs} | {100 * r['mean_accuracy']:.1f}% | {r['mean_loops']:.2f} | {r['ms_per_answer_step_b1']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="../shared/data/tinyshakespeare.txt", help="held-out text for the default model")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model for the text part")
    ap.add_argument("--chains", default="model/chains", help="chains model directory (skipped when missing)")
    ap.add_argument("--max-offset", type=int, default=9, choices=range(10), metavar="D",
                    help="chains problems' largest D (default 9; 0: copy chains, what model/chains is trained on)")
    ap.add_argument("--quick", action="store_true", help="fewer windows and problems")
    ap.add_argument("--out", default="docs/adaptive.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"command": "python -m benchmarks.adaptive " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = Path(args.text)
    if text.is_file():
        raw = text.read_text(encoding="utf-8")
        result["criteria"] = criteria_part(Path(args.model), raw, 128 if args.quick else 512)
        print_criteria(result["criteria"])
        result["text"] = text_part(Path(args.model), raw, 8 if args.quick else 16, 65 if args.quick else 129)
        print_text(result["text"])
    else:
        print(f"no text at {text}: text part skipped", file=sys.stderr)
    if (Path(args.chains) / "config.json").is_file():
        hops = list(range(1, 9))
        result["chains"] = chains_part(Path(args.chains), 20 if args.quick else 100, hops, args.max_offset)
        result["chains_max_offset"] = args.max_offset
        result["chains_targets"] = chains_targets(result["chains"])
        print_chains(result["chains"], hops)
        print(json.dumps(result["chains_targets"], indent=1))
    else:
        print(f"no chains model at {args.chains}: chains part skipped (make train-chains)", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}  ({result['command']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
