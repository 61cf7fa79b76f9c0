"""The ablation's figures (matplotlib, written as PNG files; no display needed).

    ablation_curves.png            held-out nats/char and training loss against tokens, per group
    ablation_elasticity.png        held-out nats/char at depth 1..4: fixed K=2 vs uniform K training
    ablation_update_magnitude.png  relative update magnitude per block (mean ± std over windows x seeds)
    ablation_cka.png               RBF-CKA between stages, one heatmap per scheme
    ablation_spectra.png           normalised singular values per stage, log scale
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

DIAG_VARIANTS = ("base", "anchor", "mesh")  # the paper's Figure 2-4 trio


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, works without a display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a run's metrics.jsonl."""
    train, evals = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                (evals if "eval" in rec else train).append(rec)
    return train, evals


def _smooth(y: np.ndarray, n: int = 5) -> np.ndarray:
    if len(y) < n:
        return y
    return np.convolve(y, np.ones(n) / n, mode="valid")


def curves(out: Path, results: dict, variants, s, path: Path) -> Path:
    """Top: held-out nats/char during training. Bottom: training loss minus the vanilla model's.

    Batches are a function of (seed, step), so every variant of a seed sees the same batches and
    the difference to vanilla is far less noisy than the loss itself.
    """
    plt = _plt()
    groups = [g for g in ("A", "B") if any(v.group == g and v.name in results for v in variants)]
    fig, axes = plt.subplots(2, len(groups), figsize=(6.5 * len(groups), 8), squeeze=False)
    tokens_per_step = s.batch_size * s.seq_len
    for col, g in enumerate(groups):
        ax_val, ax_train = axes[0][col], axes[1][col]
        ref = next((v for v in variants if v.group == g and v.scheme == "vanilla" and v.name in results), None)
        ref_train = {}
        if ref is not None:
            for r in results[ref.name]:
                tr, _ = read_metrics(out / "runs" / ref.name / f"seed-{r['seed']}" / "train" / "metrics.jsonl")
                ref_train[r["seed"]] = {t["step"]: t["loss"] for t in tr}
        finals = []
        for v in variants:
            if v.group != g or v.name not in results:
                continue
            val_curves, diff_curves = [], []
            for r in results[v.name]:
                tr, ev = read_metrics(out / "runs" / v.name / f"seed-{r['seed']}" / "train" / "metrics.jsonl")
                key = str(v.depth)
                pts = [(e["step"] * tokens_per_step, e["nats_per_char"][key]) for e in ev if key in e.get("nats_per_char", {})]
                if pts:
                    val_curves.append(pts)
                base = ref_train.get(r["seed"], {})
                diff = [(t["step"] * tokens_per_step, t["loss"] - base[t["step"]]) for t in tr if t["step"] in base]
                if diff:
                    diff_curves.append(diff)
            label = f"{v.name} ({v.layout}{', K~U' if v.sampling == 'uniform' else ''})"
            style = dict(color="k", ls="--", lw=2) if v.scheme == "vanilla" else dict(lw=1.5)
            if val_curves:
                n = min(len(c) for c in val_curves)
                x = np.array([p[0] for p in val_curves[0][:n]]) / 1e6
                y = np.array([[p[1] for p in c[:n]] for c in val_curves])  # (seeds, points)
                line = ax_val.plot(x, y.mean(0), marker="o", ms=3, label=label, **style)[0]
                finals.append(y.mean(0)[-1])
                if len(y) > 1:
                    ax_val.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.12)
            if diff_curves and v is not ref:
                n = min(len(c) for c in diff_curves)
                x = np.array([p[0] for p in diff_curves[0][:n]]) / 1e6
                y = _smooth(np.array([[p[1] for p in c[:n]] for c in diff_curves]).mean(0), 9)
                ax_train.plot(x[len(x) - len(y) :], y, label=label, **style)
        names = " vs ".join(sorted({v.layout for v in variants if v.group == g}, key=len))
        ax_val.set_title(f"group {g} ({names}): held-out, at the trained depth", fontsize=10)
        ax_val.set_ylabel("val nats/char (mean over seeds, band = min..max)")
        if finals:  # the interesting part is the end
            ax_val.set_ylim(min(finals) - 0.03, max(finals) + 0.25)
        ax_train.axhline(0, color="k", ls="--", lw=1)
        ax_train.set_title(f"training loss minus {ref.name if ref else 'vanilla'}'s on the same batches (smoothed)", fontsize=10)
        ax_train.set_ylabel("Δ training loss, nats/token (< 0: better than vanilla)")
        for ax in (ax_val, ax_train):
            ax.set_xlabel("training tokens (millions)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def elasticity(summary: dict, variants, path: Path) -> Path | None:
    V = summary["variants"]
    chosen = [v for v in variants if v.all_depths and v.name in V]
    if not chosen:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v in chosen:
        bd = V[v.name]["by_depth"]
        ks = sorted(int(k) for k in bd)
        m = [bd[str(k)]["nats_per_char"][0] for k in ks]
        sd = [bd[str(k)]["nats_per_char"][1] for k in ks]
        label = f"{v.name}: trained at K={v.depth}" if v.sampling == "fixed" else f"{v.name}: trained at K~U{{1..{max(ks)}}}"
        ax.errorbar(ks, m, yerr=sd, marker="o", capsize=4, label=label)
    vanilla = next((V[v.name] for v in variants if v.group == "A" and v.scheme == "vanilla" and v.name in V), None)
    if vanilla:
        ax.axhline(vanilla["nats_per_char"][0], color="gray", ls="--", label=f"vanilla {vanilla['layout']} (reference)")
    ax.set_xlabel("recursion depth K at evaluation")
    ax.set_ylabel("held-out nats/char (mean ± std over seeds)")
    ax.set_xticks(sorted({int(k) for v in chosen for k in V[v.name]["by_depth"]}))
    ax.set_title("Depth elasticity of MeSH")
    # A fixed-depth model off its depth can be far worse; keep the trained region readable.
    good = [V[v.name]["by_depth"][k]["nats_per_char"][0] for v in chosen for k in V[v.name]["by_depth"]]
    ax.set_ylim(min(good) - 0.05, min(max(good), min(good) + 1.5) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _diag(summary: dict) -> list[tuple[str, dict]]:
    V = summary["variants"]
    return [(n, V[n]["diagnostics"]) for n in DIAG_VARIANTS if n in V and V[n].get("diagnostics")]


def update_magnitude(summary: dict, path: Path) -> Path | None:
    diag = _diag(summary)
    if not diag:
        return None
    plt = _plt()
    blocks = diag[0][1]["blocks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(diag)
    x = np.arange(len(blocks))
    for i, (name, d) in enumerate(diag):
        ax.bar(x + (i - (len(diag) - 1) / 2) * width, d["update_magnitude_mean"], width, yerr=d["update_magnitude_std"], capsize=3, label=name)
    ax.set_xticks(x, blocks)
    ax.set_ylabel("2‖f(h) − h‖ / (‖f(h)‖ + ‖h‖)")
    ax.set_title(f"Relative update magnitude per block (mean ± std, {diag[0][1]['windows']} windows x seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cka(summary: dict, path: Path) -> Path | None:
    diag = _diag(summary)
    if not diag:
        return None
    plt = _plt()
    mats = [np.asarray(d["cka_mean"]) for _, d in diag]
    # One colour scale for all panels, starting below the smallest value so differences show.
    vmin = min(0.5, math.floor(min(m.min() for m in mats) * 10) / 10)
    fig, axes = plt.subplots(1, len(diag), figsize=(4.8 * len(diag), 4.4), squeeze=False, layout="constrained")
    for ax, (name, d), m in zip(axes[0], diag, mats):
        im = ax.imshow(m, vmin=vmin, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(d["stages"])), d["stages"], rotation=45)
        ax.set_yticks(range(len(d["stages"])), d["stages"])
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] < vmin + 0.6 * (1 - vmin) else "k")
        ax.set_title(f"{name}: RBF-CKA between stages", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def spectra(summary: dict, path: Path) -> Path | None:
    diag = _diag(summary)
    if not diag:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(diag), figsize=(4.6 * len(diag), 4), squeeze=False, sharey=True)
    for ax, (name, d) in zip(axes[0], diag):
        for stage, spec, er in zip(d["stages"], d["spectra_mean"], d["effective_rank_mean"]):
            ax.semilogy(np.arange(1, len(spec) + 1), spec, label=f"{stage} (eff. rank {er:.1f})")
        ax.set_xlabel("singular value index")
        ax.set_title(f"{name}: normalised spectra")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    # Values below ~1e-6 are numerical zeros (a window with fewer distinct tokens than dimensions).
    real = [x for _, d in diag for spec in d["spectra_mean"] for x in spec if x > 1e-6]
    axes[0][0].set_ylim(bottom=0.5 * min(real) if real else 1e-6, top=1.3)
    axes[0][0].set_ylabel("s_i / s_1 (mean over windows x seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_all(out: Path, results: dict, summary: dict, variants, s, figures: Path) -> list[Path]:
    made = [curves(out, results, variants, s, figures / "ablation_curves.png")]
    made.append(elasticity(summary, variants, figures / "ablation_elasticity.png"))
    made.append(update_magnitude(summary, figures / "ablation_update_magnitude.png"))
    made.append(cka(summary, figures / "ablation_cka.png"))
    made.append(spectra(summary, figures / "ablation_spectra.png"))
    return [p for p in made if p is not None]
