"""The paper's comparison at a small scale: vanilla vs base / residual / anchor / mesh, with error bars.

    python -m training.experiments.ablation --text ../shared/data/tinyshakespeare.txt --out runs/ablation
    python -m training.experiments.ablation --quick --text ../shared/data/tinyshakespeare.txt --out runs/ablation-quick
    python -m training.experiments.ablation --out runs/ablation --report-only --docs docs   # tables + PNGs again

One tokenizer, one token budget and one set of hyper-parameters for every model (MeSH, arXiv
2510.07739, Table 1, scaled down). Two groups, each at a fixed compute per token:

    group A (6 layer applications): vanilla `6`; `1+2R2+1` with base, residual, anchor, anchor_emb, mesh
                                    (a third fewer non-embedding parameters), all at fixed K=2
    group B (8 layer applications): vanilla `8`; `1+2R3+1` base and mesh at fixed K=3 (half the parameters)

plus depth elasticity: `mesh` (fixed K=2) against `mesh_uniform` (K ~ U{1..4} per step), the same
network (max_loops 4, buffer 5 slots = K + 3 as in the paper), both evaluated at every depth 1..4.
The fixed-K mesh never uses router pairs 3 and 4 in training (their gradients are dropped), so at
K=2 it is exactly the paper's model; at K=3, 4 it shows what a fixed-depth model does off its depth.

Every (variant, seed) trains into OUT/runs/VARIANT/seed-S/ (training.train, resumable) and writes
result.json when it is evaluated; a rerun skips complete runs and resumes partial ones, so the
study can be stopped and restarted. Held-out numbers come from training.evaluate on the whole
validation split (the last 10% of the text); the diagnostics from model.diagnostics on held-out
windows. OUT/report.md holds the tables, OUT/figures/ the plots (copied to --docs as ablation_*.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..common import UsageError, quiet_transformers, require_file, run_cli, write_json_atomic, write_text_atomic

# ---------------------------------------------------------------------------------------------
# What is compared
# ---------------------------------------------------------------------------------------------
# Each shape names the layouts of group A (vanilla, recursive at K=2) and group B (vanilla, K=3):
# the recursive model applies as many layers per token as its vanilla partner.
SHAPES = {
    "small": {"A": ("6", "1+2R2+1"), "B": ("8", "1+2R3+1")},
    # Pythia-160M shape (d=768, 12 heads): 12 vs 2+4R2+2 is the paper's smallest row.
    "pythia160m": {"A": ("12", "2+4R2+2"), "B": ("16", "2+4R3+2")},
}
ELASTIC_MAX_LOOPS = 4


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    layout: str
    scheme: str
    group: str  # "A" or "B": the vanilla model it is compared with
    sampling: str = "fixed"  # training depth: fixed at the layout's K, or uniform over [1, max_loops]
    max_loops: int = 0  # 0 = the layout's K
    mesh_slots: int = 0  # 0 = max_loops + 3 (the model's default)
    all_depths: bool = False  # evaluate at every depth 1..max_loops (the elasticity study)
    diagnostics: bool = False

    @property
    def depth(self) -> int:
        """The depth the variant is trained (fixed) and compared at."""
        if "R" not in self.layout:
            return 1
        return int(self.layout.split("R")[1].split("+")[0])


def all_variants(shape: str = "small") -> dict[str, Variant]:
    (va, ra), (vb, rb) = SHAPES[shape]["A"], SHAPES[shape]["B"]
    k = Variant("x", ra, "base", "A").depth
    elastic = dict(max_loops=ELASTIC_MAX_LOOPS, mesh_slots=k + 3, all_depths=True)
    vs = [
        Variant("vanilla", va, "vanilla", "A"),
        Variant("base", ra, "base", "A", diagnostics=True),
        Variant("residual", ra, "residual", "A", diagnostics=True),
        Variant("anchor", ra, "anchor", "A", diagnostics=True),
        Variant("anchor_emb", ra, "anchor_emb", "A", diagnostics=True),
        Variant("mesh", ra, "mesh", "A", diagnostics=True, **elastic),
        Variant("mesh_uniform", ra, "mesh", "A", sampling="uniform", **elastic),
        Variant("vanilla_deep", vb, "vanilla", "B"),
        Variant("base_k3", rb, "base", "B"),
        Variant("mesh_k3", rb, "mesh", "B"),
    ]
    return {v.name: v for v in vs}


# ---------------------------------------------------------------------------------------------
# Settings shared by every run of a study
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    shape: str = "small"
    vocab_size: int = 2048
    hidden_size: int = 32
    heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 0  # optimizer steps; 0 = tokens / (batch_size * seq_len)
    tokens: int = 1_000_000  # token budget per run (used when steps is 0)
    lr: float = 2e-3
    scale_embeddings: bool = True  # the paper's sqrt(d) embedding scale, the same for every variant
    val_fraction: float = 0.1
    eval_windows: int = 32  # validation windows per in-training eval (the curves)
    evals: int = 10  # in-training evals per run
    diag_windows: int = 16  # held-out windows the diagnostics average over
    diag_length: int = 128
    device: str = "auto"
    micro_batch_size: int = 0  # sequences per forward (gradient accumulation); 0 = the whole batch

    @property
    def max_steps(self) -> int:
        return self.steps or max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    @property
    def tokens_per_run(self) -> int:
        return self.max_steps * self.batch_size * self.seq_len

    def identity(self) -> dict:
        """What a finished run must match to be reused (not the device: CPU and GPU runs mix)."""
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("micro_batch_size")  # the same global batch, only split differently
        d["max_steps"] = self.max_steps
        d.pop("steps")
        d.pop("tokens")
        return d


QUICK = {"tokens": 250_000}
SEED0 = 1337  # seed i of a study is train.seed = SEED0 + i (model init, batches, depths)


def run_order(variants: list[Variant], seeds: list[int]) -> list[tuple[Variant, int]]:
    """The main comparison first (seed-major, vanilla and base leading), then elasticity, then group B.

    If a study has to be stopped early, what is done is the most useful part: the group A table
    with as many seeds as possible.
    """
    lead = {"vanilla": 0, "base": 1, "mesh": 2}

    def tier(v: Variant) -> int:
        return 2 if v.group != "A" else (1 if v.sampling != "fixed" else 0)

    pairs = [(v, seed) for v in variants for seed in seeds]
    return sorted(pairs, key=lambda p: (tier(p[0]), p[1], lead.get(p[0].name, 3), variants.index(p[0])))


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed-{seed}"


def train_config(v: Variant, seed: int, s: Settings, data_dir: Path) -> dict:
    from ..config import make_train_config

    model = {
        "layout": v.layout,
        "scheme": v.scheme,
        "hidden_size": s.hidden_size,
        "num_attention_heads": s.heads,
        "intermediate_size": 4 * s.hidden_size,
        "scale_embeddings": s.scale_embeddings,
    }
    if v.max_loops:
        model["max_loops"] = v.max_loops
    if v.mesh_slots and v.scheme == "mesh":
        model["mesh_slots"] = v.mesh_slots
    steps = s.max_steps
    train = make_train_config(
        {
            "seq_len": s.seq_len,
            "batch_size": s.batch_size,
            "micro_batch_size": s.micro_batch_size,
            "max_steps": steps,
            "lr": s.lr,
            "warmup_steps": -1,  # 1% of the steps, the paper's warmup
            "depth_sampling": v.sampling,
            "fixed_loops": v.depth,
            "eval_interval": max(1, steps // max(1, s.evals)),
            "eval_windows": s.eval_windows,
            "eval_loops": [v.depth],  # the curves; every depth is evaluated once at the end
            "log_interval": max(1, steps // 100),
            "checkpoint_interval": max(1, steps // 4),  # resumable mid-run, cheap at this size
            "keep_checkpoints": 1,
            "seed": SEED0 + seed,
            "device": s.device,
        }
    )
    return {"data": {"dir": str(data_dir)}, "model": model, "train": train}


# ---------------------------------------------------------------------------------------------
# One (variant, seed): train, evaluate, probe
# ---------------------------------------------------------------------------------------------
def load_result(path: Path, settings: Settings) -> dict | None:
    """A finished run's result.json, or None when missing or made with other settings."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    return result if result.get("settings") == settings.identity() else None


def run_one(v: Variant, seed: int, s: Settings, data_dir: Path, out: Path, threads: int = 0, log=print) -> dict:
    """Trains (or resumes) one run, evaluates it on the whole validation split and probes it."""
    import torch

    from ..checkpoint import latest_checkpoint, read_summary
    from ..common import pick_device
    from ..depth import unused_parameters
    from ..evaluate import evaluate, load_model, val_tokens_from_data
    from ..train import train

    quiet_transformers()  # no "Loading weights" bars per run in the study's log
    if threads:
        torch.set_num_threads(threads)
    rdir = run_dir(out, v.name, seed)
    done = load_result(rdir / "result.json", s)
    if done is not None:
        return done
    t0 = time.perf_counter()
    log(f"[{v.name} seed {seed}] training {v.layout} ({v.scheme}, {v.sampling} depth) for {s.max_steps} steps")
    train(train_config(v, seed, s, data_dir), rdir / "train", progress=False)
    summary = read_summary(latest_checkpoint(rdir / "train"))

    device = pick_device(s.device)
    model, model_dir = load_model(rdir / "train", device)
    tokens, counts = val_tokens_from_data(model_dir, data_dir, "val")
    depths = list(range(1, model.config.max_loops + 1)) if v.all_depths else [v.depth]
    rows = evaluate(model, tokens, counts, depths, context=s.seq_len, batch_size=16, device=device)
    trained_depth = model.config.max_loops if v.sampling == "uniform" else v.depth
    stored = model.num_parameters(exclude_embeddings=True)
    unused = sum(p.numel() for p in unused_parameters(model, trained_depth))
    result = {
        "variant": v.name,
        "seed": seed,
        "layout": v.layout,
        "scheme": v.scheme,
        "group": v.group,
        "sampling": v.sampling,
        "depth": v.depth,
        "max_loops": model.config.max_loops,
        "params_non_embedding": stored - unused,  # those the trained depths use (Pythia convention)
        "params_non_embedding_stored": stored,
        "params_total": model.num_parameters(),
        "tokens": summary["tokens"],
        "train_time_s": summary["train_time_s"],
        "eval": rows,
        "main": next(r for r in rows if r["loops"] == v.depth),
        "diagnostics": probe(model, tokens, v.depth, s, device) if v.diagnostics else None,
        "settings": s.identity(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for r in rows:
        if not all(math.isfinite(r[key]) for key in ("loss", "nats_per_char")):
            raise RuntimeError(f"{v.name} seed {seed}: non-finite held-out loss at depth {r['loops']}: {r}")
    write_json_atomic(rdir / "result.json", result)
    m = result["main"]
    log(f"[{v.name} seed {seed}] done in {result['wall_s']:.0f}s: K={v.depth} loss {m['loss']:.4f} nats/char {m['nats_per_char']:.4f}")
    return result


def probe(model, tokens, loops: int, s: Settings, device) -> dict:
    """The paper's three probes on held-out windows, one window at a time (mean and spread over windows)."""
    import torch

    from model.diagnostics import probe_model

    from ..data import eval_offsets

    length = min(s.diag_length, s.seq_len, len(tokens) - 1)
    per = {"update_magnitude": [], "cka": [], "spectra": [], "effective_rank": []}
    for o in eval_offsets(len(tokens), length, s.diag_windows):
        ids = torch.from_numpy(np.asarray(tokens[o : o + length], dtype=np.int64))[None].to(device)  # (1, L)
        p = probe_model(model, ids, loops=loops)
        per["update_magnitude"].append(p.update_magnitude.tolist())
        per["cka"].append(p.cka.tolist())
        per["spectra"].append(p.spectra.tolist())
        per["effective_rank"].append(p.effective_rank.tolist())
    return {"stages": p.stages, "blocks": p.blocks, "length": length, **per}


def _worker(args) -> tuple[str, int, dict | None, str | None]:
    v, seed, s, data_dir, out, threads = args
    try:
        return v.name, seed, run_one(v, seed, s, data_dir, out, threads), None
    except Exception:  # a failed run is reported, the others go on
        return v.name, seed, None, traceback.format_exc()


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def prepare_data(text: Path, out: Path, s: Settings) -> Path:
    from ..prepare import is_prepared, prepare

    data_dir = out / "data"
    if not is_prepared(data_dir, [text], s.vocab_size, s.val_fraction):
        prepare([text], data_dir, s.vocab_size, s.val_fraction, progress=False)
    return data_dir


def check_settings(out: Path, s: Settings) -> None:
    """One study, one set of settings: refuse to mix runs made with others into the same OUT."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != s.identity():
            diff = sorted(k for k in set(old) | set(s.identity()) if old.get(k) != s.identity().get(k))
            raise UsageError(f"{out} holds a study made with other settings ({', '.join(diff)}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, s.identity())


def run_study(runs: list[tuple[Variant, int]], s: Settings, text: Path, out: Path, jobs: int = 1, threads: int = 0, log=print) -> list[str]:
    """Runs every (variant, seed) of ``runs`` not yet complete, in order; returns the failures' messages."""
    check_settings(out, s)
    data_dir = prepare_data(text, out, s)
    todo = [(v, seed) for v, seed in runs if load_result(run_dir(out, v.name, seed) / "result.json", s) is None]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already complete; {len(todo)} to go")
    failures = []
    t0 = time.perf_counter()
    if jobs <= 1:
        for i, (v, seed) in enumerate(todo):
            try:
                run_one(v, seed, s, data_dir, out, threads, log)
            except (UsageError, KeyboardInterrupt):
                raise
            except Exception:
                failures.append(f"{v.name} seed {seed}:\n{traceback.format_exc()}")
                log(failures[-1])
            log(f"progress: {i + 1}/{len(todo)} runs, {(time.perf_counter() - t0) / 60:.1f} min")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, (v, seed, s, data_dir, out, threads)) for v, seed in todo]
            for i, f in enumerate(as_completed(futures)):
                name, seed, result, error = f.result()
                if error:
                    failures.append(f"{name} seed {seed}:\n{error}")
                    log(failures[-1])
                log(f"progress: {i + 1}/{len(todo)} runs, {(time.perf_counter() - t0) / 60:.1f} min")
    return failures


# ---------------------------------------------------------------------------------------------
# Aggregation: tables and figures
# ---------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and count."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def fmt(ms, digits: int = 4) -> str:
    mean, std, n = ms
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def collect(out: Path, variants: list[Variant], s: Settings) -> dict[str, list[dict]]:
    """Every finished result of the study, by variant (seed order)."""
    found = {}
    for v in variants:
        vdir = out / "runs" / v.name
        results = []
        for p in sorted(vdir.glob("seed-*/result.json"), key=lambda p: int(p.parent.name.split("-")[1])) if vdir.is_dir() else []:
            r = load_result(p, s)
            if r is not None:
                results.append(r)
        if results:
            found[v.name] = results
    return found


# (reference, compared): every scheme against its vanilla model and against plain recursion (base),
# and mesh against the two anchor variants.
COMPARISONS = [
    ("vanilla", "base"),
    ("vanilla", "residual"),
    ("vanilla", "anchor"),
    ("vanilla", "anchor_emb"),
    ("vanilla", "mesh"),
    ("base", "residual"),
    ("base", "anchor"),
    ("base", "anchor_emb"),
    ("base", "mesh"),
    ("anchor", "mesh"),
    ("anchor_emb", "mesh"),
    ("vanilla_deep", "base_k3"),
    ("vanilla_deep", "mesh_k3"),
    ("base_k3", "mesh_k3"),
]


def summarize(results: dict[str, list[dict]], variants: list[Variant]) -> dict:
    """Means and standard deviations over seeds, per variant, per depth, per diagnostic."""
    out = {"variants": {}, "comparisons": []}
    for v in variants:
        rs = results.get(v.name)
        if not rs:
            continue
        entry = {
            "layout": v.layout,
            "scheme": v.scheme,
            "group": v.group,
            "sampling": v.sampling,
            "depth": v.depth,
            "seeds": [r["seed"] for r in rs],
            "params_non_embedding": rs[0]["params_non_embedding"],
            "params_non_embedding_stored": rs[0]["params_non_embedding_stored"],
            "tokens": rs[0]["tokens"],
            "train_time_s": mean_std(r["train_time_s"] for r in rs),
            "per_seed": {str(r["seed"]): r["main"]["nats_per_char"] for r in rs},
        }
        for key in ("loss", "perplexity", "nats_per_char"):
            entry[key] = mean_std(r["main"][key] for r in rs)
        depths = sorted({row["loops"] for r in rs for row in r["eval"]})
        entry["by_depth"] = {
            str(k): {key: mean_std(row[key] for r in rs for row in r["eval"] if row["loops"] == k) for key in ("loss", "nats_per_char")} for k in depths
        }
        if all(r.get("diagnostics") for r in rs):
            d0 = rs[0]["diagnostics"]
            pooled = {key: np.asarray([w for r in rs for w in r["diagnostics"][key]]) for key in ("update_magnitude", "cka", "spectra", "effective_rank")}
            entry["diagnostics"] = {
                "stages": d0["stages"],
                "blocks": d0["blocks"],
                "windows": int(pooled["update_magnitude"].shape[0]),
                "update_magnitude_mean": pooled["update_magnitude"].mean(0).tolist(),
                "update_magnitude_std": pooled["update_magnitude"].std(0, ddof=1).tolist() if len(pooled["update_magnitude"]) > 1 else [0.0] * len(d0["blocks"]),
                "cka_mean": pooled["cka"].mean(0).tolist(),
                "spectra_mean": pooled["spectra"].mean(0).tolist(),
                "effective_rank_mean": pooled["effective_rank"].mean(0).tolist(),
            }
        out["variants"][v.name] = entry

    # Is the gap between two variants larger than the seed noise? Two readings: unpaired (the
    # issue's "two seed standard deviations") and paired by seed (same seed = same batches in the
    # same order, so the per-seed difference cancels the data-order part of the noise).
    for a, b in COMPARISONS:
        ea, eb = out["variants"].get(a), out["variants"].get(b)
        if not ea or not eb:
            continue
        (ma, sa, na), (mb, sb, nb) = ea["nats_per_char"], eb["nats_per_char"]
        by_seed_a = {r["seed"]: r["main"]["nats_per_char"] for r in results[a]}
        diffs = [r["main"]["nats_per_char"] - by_seed_a[r["seed"]] for r in results[b] if r["seed"] in by_seed_a]
        pm, ps, pn = mean_std(diffs)
        gap, threshold = mb - ma, 2 * max(sa, sb)
        out["comparisons"].append(
            {
                "reference": a,
                "compared": b,
                "gap_nats_per_char": gap,  # > 0: the reference is better
                "two_std": threshold,
                "seeds": min(na, nb),
                "beyond_noise": bool(min(na, nb) > 1 and abs(gap) > threshold),
                "paired_gap": (pm, ps, pn),
                "paired_beyond_noise": bool(pn > 1 and abs(pm) > 2 * ps),
            }
        )
    return out


def report_markdown(summary: dict, s: Settings, variants: list[Variant]) -> str:
    V = summary["variants"]
    lines = [
        f"Settings: shape {s.shape}, d={s.hidden_size}, {s.heads} heads, BPE vocab {s.vocab_size}, seq {s.seq_len}, "
        f"batch {s.batch_size}, {s.max_steps} steps = {s.tokens_per_run:,} tokens per run, peak lr {s.lr}, "
        f"embeddings x sqrt(d): {'on' if s.scale_embeddings else 'off'}.",
        "",
        "### Held-out loss at the trained depth (mean ± std over seeds)",
        "",
        "| variant | layout | scheme | K | non-emb. params | vs vanilla | loss (nats/token) | perplexity | nats/char | seeds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in ("A", "B"):
        ref = next((V[v.name] for v in variants if v.group == group and v.scheme == "vanilla" and v.name in V), None)
        for v in variants:
            e = V.get(v.name)
            if e is None or v.group != group or v.sampling != "fixed":
                continue
            ratio = f"{e['params_non_embedding'] / ref['params_non_embedding']:.2f}x" if ref else "—"
            lines.append(
                f"| {v.name} | `{v.layout}` | {v.scheme} | {v.depth} | {e['params_non_embedding']:,} | {ratio} | "
                f"{fmt(e['loss'])} | {fmt(e['perplexity'], 2)} | {fmt(e['nats_per_char'])} | {len(e['seeds'])} |"
            )
    if summary["comparisons"]:
        lines += [
            "",
            "### Gaps against seed noise (nats/char)",
            "",
            "Δ = compared − reference: > 0 means the reference is better. Unpaired: beyond noise when |Δ| > 2 x the",
            "larger of the two seed stds. Paired: the per-seed difference (the same seed draws the same batches), beyond",
            "noise when |mean| > 2 x its std over seeds.",
            "",
            "| reference | compared | Δ | 2 x std | unpaired beyond noise | paired Δ (mean ± std) | paired beyond noise | seeds |",
            "|---|---|---:|---:|---|---:|---|---:|",
        ]

        def verdict(flag: bool, gap: float, c: dict) -> str:
            return f"yes: {c['reference'] if gap > 0 else c['compared']} better" if flag else "no"

        for c in summary["comparisons"]:
            g, pg = c["gap_nats_per_char"], c["paired_gap"]
            lines.append(
                f"| {c['reference']} | {c['compared']} | {g:+.4f} | {c['two_std']:.4f} | {verdict(c['beyond_noise'], g, c)} | "
                f"{pg[0]:+.4f} ± {pg[1]:.4f} | {verdict(c['paired_beyond_noise'], pg[0], c)} | {c['seeds']} |"
            )
    elastic = [v for v in variants if v.all_depths and v.name in V]
    if elastic:
        depths = sorted({int(k) for v in elastic for k in V[v.name]["by_depth"]})
        lines += [
            "",
            "### Depth elasticity: held-out nats/char at each depth (mean ± std over seeds)",
            "",
            "| depth K | " + " | ".join(f"{v.name} (trained {'at K=' + str(v.depth) if v.sampling == 'fixed' else f'K~U{{1..{v.max_loops}}}'})" for v in elastic) + " |",
            "|---:|" + "---:|" * len(elastic),
        ]
        for k in depths:
            cells = [fmt(V[v.name]["by_depth"].get(str(k), {}).get("nats_per_char", (0, 0, 0))) for v in elastic]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    diag = [(name, e["diagnostics"]) for name, e in V.items() if e.get("diagnostics")]
    if diag:
        lines += [
            "",
            "### Diagnostics on held-out windows (mean over windows x seeds)",
            "",
            "| variant | relative update magnitude per block | CKA(h^(t-1), h^(t)) per loop | effective rank per stage |",
            "|---|---|---|---|",
        ]
        for name, d in diag:
            um = ", ".join(f"{b} {m:.3f}±{sd:.3f}" for b, m, sd in zip(d["blocks"], d["update_magnitude_mean"], d["update_magnitude_std"]))
            stages = d["stages"]
            loop_idx = [i for i, st in enumerate(stages) if st.startswith("h^(")]
            cka = ", ".join(f"{stages[i]}→{stages[j]} {d['cka_mean'][i][j]:.3f}" for i, j in zip(loop_idx, loop_idx[1:]))
            er = ", ".join(f"{st} {r:.1f}" for st, r in zip(stages, d["effective_rank_mean"]))
            lines.append(f"| {name} | {um} | {cka} | {er} |")
    seeds = sorted({seed for e in V.values() for seed in e["seeds"]})
    lines += [
        "",
        "### Per seed: held-out nats/char at the trained depth, and training time",
        "",
        "| variant | " + " | ".join(f"seed {k}" for k in seeds) + " | training wall time per run (mean; includes any time the process was paused) |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for name, e in V.items():
        cells = [f"{e['per_seed'][str(k)]:.4f}" if str(k) in e["per_seed"] else "—" for k in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['train_time_s'][0]:.0f} s for {e['tokens']:,} tokens |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, variants: list[Variant], s: Settings, docs: Path | None, log=print) -> dict:
    from . import plots

    results = collect(out, variants, s)
    if not results:
        raise UsageError(f"no finished runs in {out} for these settings")
    summary = summarize(results, variants)
    summary["settings"] = s.identity()
    write_json_atomic(out / "summary.json", summary)
    text = report_markdown(summary, s, variants)
    write_text_atomic(out / "report.md", text)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    made = plots.make_all(out, results, summary, variants, s, figures)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for p in made:
            shutil.copyfile(p, docs / p.name)
    log(text)
    log("figures: " + ", ".join(str(p) for p in made) + (f" (copied to {docs})" if docs else ""))
    return summary


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m training.experiments.ablation",
        description=(
            "Train vanilla, base, residual, anchor, anchor_emb and mesh models with one tokenizer, token budget "
            "and hyper-parameters, several seeds each; evaluate on held-out text (loss, perplexity, nats/char at "
            "every depth), probe them (update magnitude, CKA, spectra) and write tables and plots. "
            "Rerunning the same command skips finished runs and resumes interrupted ones."
        ),
        epilog="Variants: " + ", ".join(f"{v.name} ({v.layout} {v.scheme}{', K~uniform' if v.sampling == 'uniform' else ''})" for v in all_variants().values()),
    )
    p.add_argument("--text", metavar="FILE", help="training text (its last 10%% is held out); required unless --report-only")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory: data/, runs/VARIANT/seed-S/, report.md, summary.json, figures/")
    p.add_argument("--quick", action="store_true", help=f"one seed, {QUICK['tokens']:,} tokens per run (about 10-15 minutes on 2 CPU cores)")
    p.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; 1 with --quick)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=d.shape, help="layouts: small (6 vs 1+2R2+1, 8 vs 1+2R3+1) or pythia160m (12 vs 2+4R2+2, 16 vs 2+4R3+2)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help=f"model width d (default {d.hidden_size})")
    p.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary, shared by all runs (default {d.vocab_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"training context (default {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=0, help="sequences per forward, to fit GPU memory (default: the whole batch)")
    p.add_argument("--tokens", type=int, help=f"token budget per run (default {d.tokens:,}; {QUICK['tokens']:,} with --quick)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (overrides --tokens)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--no-scale-embeddings", action="store_true", help="do not multiply embeddings by sqrt(d) (the paper does; applies to every variant)")
    p.add_argument("--diag-windows", type=int, default=d.diag_windows, help=f"held-out windows for the diagnostics (default {d.diag_windows})")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each in its own process (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice with --jobs 1, else 1)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda (default auto)")
    p.add_argument("--shard", metavar="I/N", help="run only the runs with index %% N == I (one process per GPU); report with --report-only")
    p.add_argument("--report-only", action="store_true", help="train nothing: tables and figures from the finished runs in --out")
    p.add_argument("--docs", metavar="DIR", help="also copy the figures there (as ablation_*.png), e.g. docs")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings, list[Variant], list[int]]:
    args = build_parser().parse_args(argv)
    known = all_variants(args.shape)
    names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else list(known)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    tokens = args.tokens if args.tokens is not None else (QUICK["tokens"] if args.quick else Settings.tokens)
    for name, value in (("--seeds", seeds), ("--hidden-size", args.hidden_size), ("--heads", args.heads), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--tokens", tokens), ("--jobs", args.jobs), ("--diag-windows", args.diag_windows)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.steps < 0 or args.threads < 0 or args.micro_batch_size < 0 or args.lr <= 0:
        raise UsageError("--steps, --threads and --micro-batch-size must be >= 0 and --lr > 0")
    if args.micro_batch_size and args.batch_size % args.micro_batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by --micro-batch-size {args.micro_batch_size}")
    if args.hidden_size % args.heads:
        raise UsageError(f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}")
    s = Settings(
        shape=args.shape,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        tokens=tokens,
        lr=args.lr,
        scale_embeddings=not args.no_scale_embeddings,
        diag_windows=args.diag_windows,
        device=args.device,
        micro_batch_size=args.micro_batch_size,
    )
    return args, s, [v for v in known.values() if v.name in names], list(range(seeds))


def main(argv=None) -> int:
    def body():
        args, s, variants, seeds = parse_args(argv)
        out = Path(args.out)
        docs = Path(args.docs) if args.docs else None
        failures = []
        if not args.report_only:
            if not args.text:
                raise UsageError("--text FILE is required (or --report-only)")
            text = require_file(args.text, "text file")
            runs = run_order(variants, seeds)
            if args.shard:
                try:
                    i, n = (int(x) for x in args.shard.split("/"))
                except ValueError:
                    raise UsageError(f"--shard expects I/N like 0/4, got {args.shard!r}") from None
                if not 0 <= i < n:
                    raise UsageError(f"--shard {args.shard}: need 0 <= I < N")
                runs = runs[i::n]
            threads = args.threads or (0 if args.jobs == 1 else 1)
            t0 = time.perf_counter()
            failures = run_study(runs, s, text, out, args.jobs, threads)
            print(f"training and evaluation: {(time.perf_counter() - t0) / 60:.1f} min")
        if not args.shard or args.report_only:
            write_report(out, variants, s, docs)
        if failures:
            print(f"{len(failures)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
            return 1
        return 0

    return run_cli("ablation", body)


if __name__ == "__main__":
    raise SystemExit(main())
