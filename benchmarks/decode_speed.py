"""8. Decode speed: every target of the decode-speed work, measured in one run, printed with its verdict.

    python -m benchmarks.decode_speed --out docs/decode-speed.json        # make bench-decode (about 15 min)
    python -m benchmarks.decode_speed --quick --out /tmp/decode-speed.json    # fewer tokens and rounds
    python -m benchmarks.decode_speed --parts inproc,sampled --out /tmp/d.json

Parts (1 torch thread everywhere unless --threads; contenders interleaved, ABBA, ratios per round):
- inproc: the vanilla twin of docs/BENCHMARKS.md part 1 (random weights, the default model's dimensions,
  N(default depth) layers) in float32 and in bfloat16, batches 1 and 32: HF `generate()` on the converted
  GPT-NeoX, our engine eager (--compile off) and compiled (--compile on, batch buckets the CPU compiles),
  and the kernel floor (every Linear and one SDPA per layer alone, benchmarks/decode.py). Greedy tokens
  compared with HF's.
- depths (for scripts/gpu_check.sh): the default model at loops 1-4 (--compile auto) against HF
  `generate()` on a vanilla twin with as many layers as that depth applies, batches 1, 8, 32.
- sampled: our engine at batch 32, temperature 0.8 / top-p 0.95 against greedy.
- http: one stream at the default depth through a real server (--threads 1; --compile off and on)
  against the twin's `generate()` with one thread, 128 tokens.
- c32: 64 requests at concurrency 32 through HTTP, this server against the engine of --baseline-ref
  (the engine before engine v2 and the decode-speed work) from a git worktree, same model and flags.
- overhead: MeSH over `base` per batch size and depth (benchmarks/depth.py, paired per round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from . import common
from .common import greedy, make_engine, median, prompt_ids, random_model
from .decode import KernelFloor, hf_model, vanilla_twin

PARTS = ("inproc", "depths", "sampled", "http", "c32", "overhead")
PLANS = {"full": dict(tokens=128, reps=4, http_rounds=3, c32_requests=64, c32_tokens=64, depth_rounds=8),
         "quick": dict(tokens=48, reps=2, http_rounds=1, c32_requests=32, c32_tokens=32, depth_rounds=3)}


def _timed(fn, device=None):
    common.sync(device)
    t0 = time.perf_counter()
    out = fn()
    common.sync(device)
    return time.perf_counter() - t0, out


def _rounds(contenders: dict, reps: int, device=None) -> tuple[dict, dict]:
    """name -> seconds per round (ABBA order) and each contender's tokens of the first round."""
    times, tokens = {n: [] for n in contenders}, {}
    for r in range(reps):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            dt, out = _timed(contenders[name], device)
            times[name].append(dt)
            tokens.setdefault(name, out)
    return times, tokens


def part_inproc(subject, p: dict, dtype: torch.dtype, device: str = "cpu", batches=(1, 32)) -> list[dict]:
    n = p["tokens"]
    config = vanilla_twin(subject.config, 32 + n + 16)
    mesh = random_model(config, 0, device, dtype)
    neox = hf_model(mesh)
    eager = make_engine(mesh, subject.tokenizer, max_batch_size=max(batches), compile="off")
    compiled = make_engine(mesh, subject.tokenizer, max_batch_size=max(batches), compile="on")
    rows = []
    for B in batches:
        prompts = prompt_ids(subject.tokenizer, B, 32, config.vocab_size, B)
        ids = torch.tensor(prompts, device=device)

        @torch.inference_mode()
        def hf(k=n):
            out = neox.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False)
            return out[:, 32:].tolist()

        contenders = {"hf": hf, "eager": lambda k=n: [c.token_ids for c in eager.generate(prompts, greedy(k))]}
        graphs = compiled.runner.compiled
        if graphs.covers(B):
            graphs.warm_up(config.default_loops, (B,))
            contenders["compiled"] = lambda k=n: [c.token_ids for c in compiled.generate(prompts, greedy(k))]
        for fn in contenders.values():
            fn(8)  # warm-up
        times, tokens = _rounds(contenders, p["reps"], device)
        floor = KernelFloor(mesh, B, 32 + n // 2)
        floor.gemms(), floor.attention()
        t_floor = min(_timed(floor.gemms, device)[0] + _timed(floor.attention, device)[0] for _ in range(10))
        row = {"dtype": str(dtype).replace("torch.", ""), "batch": B, "floor_ms": 1e3 * t_floor}
        for name, ts in times.items():
            row[f"{name}_ms"] = 1e3 * median(ts) / n
            if name != "hf":
                row[f"{name}_vs_hf"] = median([h / o for h, o in zip(times["hf"], ts)])
                row[f"{name}_over_floor"] = row[f"{name}_ms"] / row["floor_ms"]
                row[f"{name}_identical"] = f"{sum(a == b for a, b in zip(tokens[name], tokens['hf']))}/{B}"
        rows.append(row)
    return rows


def part_depths(subject, p: dict, device: str, batches=(1, 8, 32)) -> list[dict]:
    """Ours (the subject at loops K, --compile auto) against HF on a twin of N(K) layers: different
    weights, so tokens are not compared; ms per step and the ratio."""
    n, rows = p["tokens"], []
    engine = make_engine(subject.model, subject.tokenizer, max_batch_size=max(batches))
    for K in range(1, subject.config.max_loops + 1):
        neox = hf_model(random_model(vanilla_twin(subject.config, 32 + n + 16, K), 0, device, subject.model.dtype))
        for B in batches:
            prompts = prompt_ids(subject.tokenizer, B, 32, subject.config.vocab_size, B)
            ids = torch.tensor(prompts, device=device)

            @torch.inference_mode()
            def hf(k=n):
                neox.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False)

            contenders = {"hf": hf, "ours": lambda k=n: engine.generate(prompts, greedy(k), loops=K)}
            for fn in contenders.values():
                fn(8)
            times, _ = _rounds(contenders, p["reps"], device)
            rows.append({"loops": K, "batch": B, "hf_ms": 1e3 * median(times["hf"]) / n,
                         "ours_ms": 1e3 * median(times["ours"]) / n,
                         "ours_vs_hf": median([h / o for h, o in zip(times["hf"], times["ours"])])})
    return rows


def part_sampled(subject, p: dict) -> dict:
    from server import SamplingParams

    n = p["tokens"]
    engine = make_engine(subject.model, subject.tokenizer, max_batch_size=32)
    prompts = prompt_ids(subject.tokenizer, 32, 32, subject.config.vocab_size, 7)
    sampled = SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, ignore_eos=True, detokenize=False, seed=1)
    contenders = {"greedy": lambda: engine.generate(prompts, greedy(n)), "sampled": lambda: engine.generate(prompts, sampled)}
    times, _ = _rounds(contenders, p["reps"])
    return {"batch": 32, "greedy_ms": 1e3 * median(times["greedy"]) / n, "sampled_ms": 1e3 * median(times["sampled"]) / n,
            "sampled_over_greedy": median([s / g for s, g in zip(times["sampled"], times["greedy"])])}


def _stream_seconds(url: str, prompt: str, tokens: int) -> float:
    from .loadgen import send

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    res = asyncio.run(send(url, body))
    if not res["ok"] or res["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"a timed request failed: {res.get('error')}")
    return time.perf_counter() - t0


def part_http(subject, p: dict, work: Path) -> dict:
    from .harness import ServerProcess

    tokens, prompt = 128, "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    ids = torch.tensor([subject.tokenizer(prompt)["input_ids"]])
    neox = hf_model(random_model(vanilla_twin(subject.config, ids.shape[1] + tokens + 16), 0))

    @torch.inference_mode()
    def hf():
        neox.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    model = str(subject.directory or common.save_subject(subject, work / "subject"))
    servers = {mode: ServerProcess(["--model", model, "--compile", mode, "--log-level", "warning"], work / f"http-{mode}.log")
               for mode in ("off", "on")}
    try:
        for s in servers.values():
            s.wait_ready(240)
        contenders = {"hf": hf, **{f"http_{m}": (lambda s=s: _stream_seconds(s.url, prompt, tokens)) for m, s in servers.items()}}
        for fn in contenders.values():
            fn()  # warm-up (the compiled server's graph was compiled at its start)
        times, _ = _rounds(contenders, 2 * p["http_rounds"])
        c32 = {m: _concurrent_tokens_per_s(s.url, prompt, p) for m, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()
    out = {"tokens": tokens, "hf_s": median(times["hf"]), "c32_tokens_per_s": c32}
    for m in servers:
        out[f"http_{m}_s"] = median(times[f"http_{m}"])
        out[f"http_{m}_vs_hf"] = median([h / o for h, o in zip(times["hf"], times[f"http_{m}"])])
    return out


def _concurrent_tokens_per_s(url: str, prompt: str, p: dict) -> float:
    from .loadgen import level_stats, offer

    body = {"prompt": prompt, "max_tokens": p["c32_tokens"], "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    results = asyncio.run(offer(url, [body] * p["c32_requests"], concurrency=32))
    stats = level_stats(results, time.perf_counter() - t0)
    if stats["errors"]:
        raise RuntimeError(f"{stats['errors']} failed requests at concurrency 32: {stats['error_examples']}")
    return stats["output_throughput"]


def part_c32(subject, p: dict, work: Path, baseline_ref: str) -> dict:
    from .engine_v2 import baseline_tree
    from .harness import ROOT, ServerProcess

    model = str(subject.directory or common.save_subject(subject, work / "subject"))
    flags = ["--model", model, "--max-batch-size", "32", "--log-level", "warning", "--max-waiting", "1024"]
    trees = {"baseline": baseline_tree(baseline_ref), "ours": ROOT}
    runs = {name: [] for name in trees}
    for r in range(2):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            with ServerProcess(flags, work / f"c32-{name}.log", cwd=trees[name]) as s:
                _stream_seconds(s.url, "ROMEO:", 4)  # warm-up
                runs[name].append(_concurrent_tokens_per_s(s.url, "ROMEO:\nBut soft, what light", p))
    return {"baseline_ref": baseline_ref, "tokens_per_s": runs,
            "ours_over_baseline": median([o / b for o, b in zip(runs["ours"], runs["baseline"])])}


def targets(res: dict) -> list[dict]:
    """(target, value, met) for what ran."""
    out = []

    def add(name, value, goal, met):
        out.append({"target": name, "value": value, "goal": goal, "met": bool(met)})

    for row in res.get("inproc", []):
        B, dt = row["batch"], row["dtype"]
        best = min((k for k in ("eager", "compiled") if f"{k}_ms" in row), key=lambda k: row[f"{k}_ms"])
        if dt == "float32":
            add(f"fp32 batch {B}: best step / kernel floor ({best}; {row[f'{best}_vs_hf']:.2f}x HF)",
                round(row[f"{best}_over_floor"], 3), "<= 1.15", row[f"{best}_over_floor"] <= 1.15)
        else:
            goal = 5 if res["machine"].get("device", "cpu").startswith("cuda") else 2
            add(f"bf16 batch {B}: ours ({best}) / HF in bf16", round(row[f"{best}_vs_hf"], 3), f">= {goal}",
                row[f"{best}_vs_hf"] >= goal)
    if "http" in res:
        h = res["http"]
        best = max(h["http_off_vs_hf"], h["http_on_vs_hf"])
        add("HTTP one stream, --threads 1, vs the twin's generate() (best of --compile off/on)", round(best, 3), ">= 1.5", best >= 1.5)
    if "c32" in res:
        v = res["c32"]["ours_over_baseline"]
        add(f"HTTP concurrency 32, output tok/s vs the {res['c32']['baseline_ref']} engine", round(v, 3), ">= 1.5", v >= 1.5)
    if "sampled" in res:
        v = res["sampled"]["sampled_over_greedy"]
        add("sampled (T 0.8, top-p 0.95) / greedy step time, batch 32", round(v, 3), "<= 1.10", v <= 1.10)
    if "overhead" in res:
        worst = max(x["overhead"] for x in res["overhead"]["mesh_overhead"])
        add("MeSH over base, worst batch x depth", round(worst, 3), "<= 0.08", worst <= 0.08)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_speed", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, metavar="FILE.json",
                    help="results; the tables go to FILE.md and the plot to FILE.png beside it")
    ap.add_argument("--from-json", action="store_true", help="measure nothing: redraw FILE.md and FILE.png from --out")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-ref", default="5ede606", help="c32: the commit whose server is the baseline")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (inproc then runs bfloat16 at batches 1, 8, 32)")
    args = ap.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if any(x not in PARTS for x in parts):
        ap.error(f"--parts: choose from {', '.join(PARTS)}")
    if args.from_json:
        res = json.loads(args.out.read_text(encoding="utf-8"))
        save(res, args.out)
        print(report(res))
        return 0
    torch.set_num_threads(args.threads)
    p = PLANS["quick" if args.quick else "full"]
    cuda = args.device.startswith("cuda")
    subject = common.load_subject(device=args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    work = Path("/tmp") / "mesh-decode-speed"
    work.mkdir(parents=True, exist_ok=True)
    res = {"command": "python -m benchmarks.decode_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": common.machine(args.device), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for part in parts:
        print(f"[decode_speed] {part} ...", file=sys.stderr, flush=True)
        res.setdefault("load_average", {})[part] = common.load_average()
        if part == "inproc" and cuda:
            res["inproc"] = part_inproc(subject, p, torch.bfloat16, args.device, (1, 8, 32))
        elif part == "inproc":
            res["inproc"] = part_inproc(subject, p, torch.float32) + part_inproc(subject, p, torch.bfloat16)
        elif part == "depths":
            res["depths"] = part_depths(subject, p, args.device)
        elif part == "sampled":
            res["sampled"] = part_sampled(subject, p)
        elif part == "http":
            res["http"] = part_http(subject, p, work)
        elif part == "c32":
            res["c32"] = part_c32(subject, p, work, args.baseline_ref)
        elif part == "overhead":
            from . import depth

            d = depth.run(subject, (1, 32), rounds=p["depth_rounds"], steps=8, quiet=True)
            res["overhead"] = {"mesh_overhead": d["mesh_overhead"], "mesh_overhead_all": d["mesh_overhead_all"]}
        save(res, args.out)  # after every part: a later failure keeps what was measured
    print(report(res))
    return 0


def save(res: dict, out: Path) -> None:
    res["targets"] = targets(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(report(res) + "\n", encoding="utf-8")  # the tables, for docs/ (and docs/gpu/)
    if res.get("inproc"):
        plot(res["inproc"], out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """ms per decode step of each contender, per (dtype, batch), with the kernel floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("hf_ms", "HF generate()"), ("eager_ms", "ours, eager"), ("compiled_ms", "ours, compiled"), ("floor_ms", "kernel floor")]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4))
    for ax, row in zip(axes, rows):
        vals = [row.get(k, 0.0) for k, _ in names]
        ax.bar(range(len(names)), vals, color=["#888", "#1f77b4", "#2ca02c", "#ccc"])
        ax.set_xticks(range(len(names)), [n for _, n in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{row['dtype']}, batch {row['batch']}", fontsize=9)
        ax.set_ylabel("ms per decode step" if ax is axes[0] else "")
    fig.suptitle("decode step against HF transformers (vanilla twin, 1 thread, this CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict) -> str:
    lines = [f"# decode speed ({res['command']})", ""]
    if "inproc" in res:
        lines += ["| dtype | batch | HF ms/step | eager ms | compiled ms | floor ms | eager/HF speedup | compiled/HF | eager/floor | identical |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["inproc"]:
            c = lambda k, f="{:.2f}": f.format(r[k]) if k in r else "-"  # noqa: E731
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['hf_ms']:.2f} | {r['eager_ms']:.2f} | {c('compiled_ms')} | "
                         f"{r['floor_ms']:.2f} | {r['eager_vs_hf']:.2f}x | {c('compiled_vs_hf', '{:.2f}x')} | "
                         f"{r['eager_over_floor']:.2f} | {r['eager_identical']} |")
        lines.append("")
    if "depths" in res:
        lines += ["| loops | batch | HF ms/step (N(K)-layer twin) | ours ms/step | ours/HF speedup |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['loops']} | {r['batch']} | {r['hf_ms']:.2f} | {r['ours_ms']:.2f} | {r['ours_vs_hf']:.2f}x |" for r in res["depths"]]
        lines.append("")
    lines += ["| target | value | goal | verdict |", "|---|---:|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['goal']} | {'met' if t['met'] else 'MISSED'} |" for t in res["targets"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
