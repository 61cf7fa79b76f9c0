"""Runs the benchmarks and writes the numbers as JSON (plus markdown tables on stdout, plots in full runs).

    python -m benchmarks.run --out docs/benchmarks.json            # make bench: 1-5, plots docs/bench_*.png
    python -m benchmarks.run --quick --out bench-quick.json        # make bench-quick: reduced 1-3, < 3 min
    python -m benchmarks.run --sections serving --out s.json       # one part
    python -m benchmarks.run --from-json docs/benchmarks.json --plots docs   # redraw tables and plots
    python -m benchmarks.run --sections engine_v2 --out docs/benchmarks-engine-v2.json   # 5: Engine v2 vs --baseline-ref

Headline keys in the JSON: decode_speedup_vs_hf_b1, decode_speedup_vs_hf_b32, depth_fit_r2,
mesh_overhead_vs_base, mixed_depth_cost_ratio (and serving_c32_over_c1 when serving runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

SECTIONS = ("decode", "depth", "mixed", "serving", "engine_v2")

# (full, quick, tiny) settings of each knob
PLANS = {
    "full": dict(new_tokens=256, reps=5, warmup_tokens=32, rounds=16, steps=8, batches=(1, 32),
                 serving=dict(concurrency=(1, 4, 16, 32, 64), rates=(1.0, 2.0, 4.0, 8.0), max_tokens=128,
                              per_level=lambda c: max(16, 4 * c), per_rate=32)),
    "quick": dict(new_tokens=64, reps=3, warmup_tokens=8, rounds=6, steps=4, batches=(1, 32),
                  serving=dict(concurrency=(1, 4, 16, 32), rates=(2.0, 8.0), max_tokens=32,
                               per_level=lambda c: max(4, c), per_rate=16)),
    "tiny": dict(new_tokens=8, reps=2, warmup_tokens=2, rounds=2, steps=2, batches=(1, 4),
                 serving=dict(concurrency=(1, 4), rates=(8.0,), max_tokens=8, per_level=lambda c: max(2, c),
                              per_rate=4)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmarks of the MeSH engine and server: (1) decode tokens/s against Hugging Face generate() "
                    "on identical weights, (2) decode cost per recursion depth and MeSH vs base, KV bytes per token, "
                    "(3) mixed-depth batches and admission at a KV budget, (4) HTTP serving load against a real "
                    "uvicorn server, (5) Engine v2 against the engine of --baseline-ref (benchmarks/engine_v2.py). "
                    "Writes JSON with the headline ratios; prints markdown tables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, metavar="FILE.json", help="where to write the results (required unless --from-json)")
    p.add_argument("--quick", action="store_true", help="reduced sections 1-3 (64 new tokens, 3 repetitions), under 3 minutes")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and a few steps: checks the machinery (tests)")
    p.add_argument("--sections", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(SECTIONS)}; default: all (--quick: decode,depth,mixed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both engines (1: on a shared 2-core machine, 2 OpenMP threads "
                        "spin-wait on each other and timings become erratic)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write docs-style PNGs (bench_*.png) here; default: the --out directory for a full run, none for --quick/--tiny")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE.json",
                   help="measure nothing: print the tables and draw the plots (--plots DIR) of an earlier run")
    p.add_argument("--baseline-ref", default="5ede606",
                   help="engine_v2: the commit whose engine the new one is measured against (a git worktree in /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def headline(results: dict) -> dict:
    """The five (six) figures the issue asks for, from the sections that ran (NaN where one did not)."""
    nan = float("nan")
    h = {"decode_speedup_vs_hf_b1": nan, "decode_speedup_vs_hf_b32": nan, "depth_fit_r2": nan,
         "mesh_overhead_vs_base": nan, "mixed_depth_cost_ratio": nan}
    if "decode" in results:
        rows = results["decode"]["rows"]
        h["decode_speedup_vs_hf_b1"] = rows[0]["speedup"]
        h["decode_speedup_vs_hf_b32"] = rows[-1]["speedup"]
    if "depth" in results:
        d = results["depth"]
        first = d["schemes"][0]
        fit = next(f for f in d["fits"] if f["scheme"] == first)  # the subject's scheme, the first batch size
        h["depth_fit_r2"] = fit["r2"]
        if "mesh_overhead_all" in d:
            h["mesh_overhead_vs_base"] = d["mesh_overhead_all"]  # paired per round, pooled over batch sizes and K
    if "mixed" in results:
        h["mixed_depth_cost_ratio"] = results["mixed"]["cost_ratio"]
    if "serving" in results:
        h["serving_c32_over_c1"] = results["serving"].get("c32_over_c1", nan)
    if "engine_v2" in results:
        h["engine_v2_targets_met"] = sum(t["met"] for t in results["engine_v2"]["targets"])
        h["engine_v2_targets"] = len(results["engine_v2"]["targets"])
    return h


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return replay(args)
    if args.out is None:
        parser.error("--out is required (or --from-json to redraw an earlier run)")
    plan_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = PLANS[plan_name]
    default_sections = SECTIONS if plan_name == "full" else SECTIONS[:3]
    sections = default_sections if args.sections is None else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"benchmarks.run: error: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"benchmarks.run: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.run: error: --device cuda asked for, but no CUDA GPU is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from . import common, report

    started = time.time()
    subject = common.load_subject(args.tiny, args.device, torch.float32, args.seed)
    results: dict = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "plan": plan_name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": common.machine(args.device),
        "subject": {"source": subject.source, "layout": subject.config.layout, "scheme": subject.config.scheme,
                    "max_loops": subject.config.max_loops, "hidden_size": subject.config.hidden_size,
                    "heads": subject.config.num_attention_heads, "intermediate_size": subject.config.intermediate_size,
                    "vocab_size": subject.config.vocab_size, "context": subject.config.max_position_embeddings},
    }
    kw = dict(seed=args.seed, quiet=args.quiet)
    for section in sections:
        t0 = time.perf_counter()
        print(f"[{section}] running ({plan_name}) ...", file=sys.stderr, flush=True)
        results.setdefault("load_average_at_section_start", {})[section] = common.load_average()
        if section == "decode":
            from . import decode

            results["decode"] = decode.run(subject, plan["batches"], new_tokens=plan["new_tokens"], reps=plan["reps"],
                                           warmup_tokens=plan["warmup_tokens"], **kw)
        elif section == "depth":
            from . import depth

            results["depth"] = depth.run(subject, plan["batches"], rounds=plan["rounds"], steps=plan["steps"],
                                         device=args.device, **kw)
        elif section == "mixed":
            from . import mixed

            results["mixed"] = mixed.run(subject, rows=plan["batches"][-1], rounds=plan["rounds"],
                                         steps=plan["steps"], device=args.device, **kw)
        elif section == "serving":
            from . import serving

            results["serving"] = serving.run(subject, plan["serving"], threads=args.threads, device=args.device, **kw)
        elif section == "engine_v2":
            from . import engine_v2

            results["engine_v2"] = engine_v2.run(plan_name, baseline_ref=args.baseline_ref, threads=args.threads, **kw)
        results.setdefault("seconds", {})[section] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_at_end"] = common.load_average()
    results["headline"] = headline(results)
    results["total_seconds"] = round(time.time() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=True) + "\n", encoding="utf-8")
    plots = args.plots if args.plots is not None else (args.out.parent if plan_name == "full" else None)
    if plots is not None:
        written = report.plots(results, plots)
        print("plots: " + ", ".join(str(p) for p in written), file=sys.stderr)
    print(report.markdown(results))
    print(f"wrote {args.out} in {results['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def replay(args) -> int:
    from . import report

    try:
        results = json.loads(args.from_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"benchmarks.run: error: cannot read {args.from_json}: {e}", file=sys.stderr)
        return 2
    if args.plots is not None:
        print("plots: " + ", ".join(str(p) for p in report.plots(results, args.plots)), file=sys.stderr)
    print(report.markdown(results))
    return 0


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
