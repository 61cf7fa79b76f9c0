"""Markdown tables and matplotlib figures from a results dict (what run.py writes as JSON)."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or x != x else fmt.format(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    m = r["machine"]
    parts = [
        f"Run `{r['command']}` ({r['plan']}), {r['started']}: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"with {m['torch_threads']} thread(s), transformers {m['transformers']}, device {m['device']}; "
        f"load average {m['load_average_1_5_15']} at start, {m.get('load_average_at_end')} at the end. "
        f"Subject: {r['subject']['source']} ({r['subject']['layout']} {r['subject']['scheme']}, d={r['subject']['hidden_size']}).",
        "",
        "Headline: " + ", ".join(f"{k} = {_f(v, '{:.3f}')}" for k, v in r["headline"].items()),
    ]
    if "decode" in r:
        d = r["decode"]
        mm = d["model"]
        parts += ["", f"**Decode vs Hugging Face** ({mm['layout']}-layer vanilla, d={mm['hidden_size']}, {mm['parameters']:,} "
                      f"parameters, {mm['dtype']}, HF attention {mm['hf_attention']}, {mm['hf_cache']}; greedy, "
                      f"{d['prompt_len']}-token prompt, {d['new_tokens']} new tokens, median of {d['reps']} interleaved runs)", ""]
        parts.append(_table(
            ["batch", "ours tok/s", "HF tok/s", "speedup (median of paired ratios)", "ours ms/step", "HF ms/step",
             "GEMM + attention floor ms/step", "max speedup with the same kernels", "greedy rows identical"],
            [[x["batch"], _f(x["ours_tok_s"], "{:.0f}"), _f(x["hf_tok_s"], "{:.0f}"), _f(x["speedup"]) + "x",
              _f(x["ours_ms_per_step"]), _f(x["hf_ms_per_step"]),
              _f(x["gemm_floor_ms_per_step"]) + " + " + _f(x["attention_floor_ms_per_step"]),
              _f(x["max_speedup_same_kernels"]) + "x", x["greedy_rows_identical"]] for x in d["rows"]]))
    if "depth" in r:
        d = r["depth"]
        by = {(x["scheme"], x["batch"], x["loops"]): x for x in d["rows"]}
        batches = sorted({x["batch"] for x in d["rows"]})
        header = ["K", "layers N(K)"] + [f"{s} B={B} ms/token" for B in batches for s in d["schemes"]]
        if "mesh_overhead" in d:
            header += [f"MeSH overhead B={B}" for B in batches]
        ov = {(o["batch"], o["loops"]): o["overhead"] for o in d.get("mesh_overhead", [])}
        rows = []
        for K in d["depths"]:
            first = by[(d["schemes"][0], batches[0], K)]
            row = [K, first["layers_applied"]] + [_f(by[(s, B, K)]["ms_per_token"], "{:.3f}") for B in batches for s in d["schemes"]]
            row += [_f(100 * ov[(B, K)], "{:+.1f}%") for B in batches if (B, K) in ov]
            rows.append(row)
        parts += ["", f"**Cost per depth** (decode steps after a {d['prompt_len']}-token prompt; median over "
                      f"{d['rounds']} interleaved rounds of the mean of {d['steps_timed'] // d['rounds']} consecutive steps)",
                  "", _table(header, rows), ""]
        if "mesh_overhead_all" in d:
            parts += [f"MeSH overhead over base, median of paired per-round ratios pooled over batch sizes and K: "
                      f"{_f(100 * d['mesh_overhead_all'], '{:+.1f}%')}", ""]
        parts.append(_table(
            ["scheme", "batch", "a (ms/token)", "b (ms/token per loop)", "R^2", "one core pass (ms/token)", "b / core pass"],
            [[f["scheme"], f["batch"], _f(f["a_ms"], "{:.3f}"), _f(f["b_ms"], "{:.3f}"), _f(f["r2"], "{:.4f}"),
              _f(f["core_pass_ms"], "{:.3f}"), _f(f["b_over_core_pass"])] for f in d["fits"]]))
        parts += ["", _table(
            ["K", "layers N(K)", "KV bytes/token measured in the pool", "pool accounting", "model.kv_bytes_per_token",
             "2*N(K)*d*bytes", "tiers allocated beyond K"],
            [[k["loops"], k["layers"], k["measured"], k["accounted"], k["model"], k["formula"],
              k["tiers_allocated_beyond_depth"] or "none"] for k in d["kv"]])]
    if "mixed" in r:
        x = r["mixed"]
        ms = x["step_ms"]
        D, h = x["deep"], x["rows"] // 2
        parts += ["", f"**Mixed-depth batching** (one decode step; median over {x['rounds']} interleaved rounds of the mean "
                      f"of {x['steps_timed'] // x['rounds']} consecutive steps)", ""]
        parts.append(_table(["batch", "step ms"], [
            [f"{h} x depth {D} + {h} x depth 1 (mixed)", _f(ms["mixed"])],
            [f"{x['rows']} x depth {D}", _f(ms["deep32"])],
            [f"{x['rows']} x depth 1", _f(ms["shallow32"])],
            [f"{h} x depth {D}", _f(ms["deep16"])],
            [f"{h} x depth 1", _f(ms["shallow16"])],
            [f"predicted from active rows ({x['rows']} x depth 1 + ({h} x depth {D} - {h} x depth 1))", _f(x["predicted_ms"])],
            [f"the two groups separately ({h} x depth {D} + {h} x depth 1)", _f(x["separately_ms"])],
        ]))
        parts += ["", f"mixed / predicted = {_f(x['cost_ratio'], '{:.3f}')} (median of per-round ratios: "
                      f"{_f(x.get('cost_ratio_per_round_median'), '{:.3f}')}), mixed / {x['rows']} x depth {D} = "
                      f"{_f(x['mixed_over_deep32'], '{:.3f}')}, mixed / separately = {_f(x['mixed_over_separately'], '{:.3f}')}"]
        a = x["admission"]
        parts += ["", f"Admission at a {a['budget_mb']:g} MiB KV budget, requests of {a['prompt_len']} + {a['max_tokens']} tokens:", ""]
        parts.append(_table(["loops", "KV bytes/token", "admitted", "budget / bytes per request"],
                            [[y["loops"], y["kv_bytes_per_token"] or "", y["admitted"], _f(y["budget_over_request_bytes"], "{:.1f}")]
                             for y in a["rows"]]))
    if "serving" in r:
        s = r["serving"]
        parts += ["", f"**Serving load** (uvicorn on 127.0.0.1, streaming, depths {s['depths']} mixed, "
                      f"{s['prompt_len']}-token prompts, {s['max_tokens']} tokens each, ignore_eos)", ""]
        header = ["load", "requests", "errors", "duration s", "req/s", "output tok/s", "TTFT mean/median/p99 ms",
                  "TPOT mean/median/p99 ms", "ITL mean/median/p99 ms", "CPU cores used: server / client"]

        def trio(t):
            return "/".join(_f(t[k], "{:.0f}") for k in ("mean", "median", "p99"))

        rows = [[lv["label"], lv["requests"], lv["errors"], _f(lv["duration_s"], "{:.1f}"), _f(lv["request_throughput"]),
                 _f(lv["output_throughput"], "{:.0f}"), trio(lv["ttft_ms"]), trio(lv["tpot_ms"]), trio(lv["itl_ms"]),
                 _f(lv.get("server_cpu_per_s")) + " / " + _f(lv.get("client_cpu_per_s"))]
                for lv in s["levels"]]
        parts.append(_table(header, rows))
        parts += ["", f"output tok/s at concurrency 32 / concurrency 1 = {_f(s.get('c32_over_c1'))}"]
    if "engine_v2" in r:
        from . import engine_v2

        parts += ["", engine_v2.markdown(r["engine_v2"])]
    return "\n".join(parts)


def plots(r: dict, out: Path) -> list[Path]:
    """docs/bench_*.png for the sections present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    m = r["machine"]
    where = f"{m['cpu']}, {m['torch_threads']} torch thread(s), {m['device']}"

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "decode" in r:
        d = r["decode"]
        rows = d["rows"]
        fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8))
        axes = list(axes) if len(rows) > 1 else [axes]
        for ax, row in zip(axes, rows):
            bars = ax.bar(["ours\n(engine, no HTTP)", "HF generate()\n(DynamicCache, SDPA)"],
                          [row["ours_tok_s"], row["hf_tok_s"]], color=["C0", "C1"])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_title(f"batch {row['batch']}: {row['speedup']:.2f}x", fontsize=10)
            ax.set_ylabel("generated tokens/s")
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"Greedy decode, {d['model']['layout']}-layer vanilla d={d['model']['hidden_size']}, "
                     f"{d['prompt_len']}+{d['new_tokens']} tokens ({where})", fontsize=9)
        save(fig, "bench_decode.png")
    if "depth" in r:
        d = r["depth"]
        batches = sorted({x["batch"] for x in d["rows"]})
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8))
        axes = list(axes) if len(batches) > 1 else [axes]
        for ax, B in zip(axes, batches):
            for s in d["schemes"]:
                pts = [(x["loops"], x["ms_per_token"]) for x in d["rows"] if x["scheme"] == s and x["batch"] == B]
                fit = next(f for f in d["fits"] if f["scheme"] == s and f["batch"] == B)
                ks = [p[0] for p in pts]
                line = ax.plot(ks, [p[1] for p in pts], "o", label=f"{s}: a={fit['a_ms']:.3f}, b={fit['b_ms']:.3f}, R²={fit['r2']:.3f}")
                ax.plot(ks, [fit["a_ms"] + fit["b_ms"] * k for k in ks], "-", color=line[0].get_color(), alpha=0.6)
            ax.set_xticks(d["depths"])
            ax.set_xlabel("loops K")
            ax.set_ylabel("decode ms / token")
            ax.set_title(f"batch {B}", fontsize=10)
            ax.legend(fontsize=7)
        fig.suptitle(f"Cost per depth ({r['subject']['layout']}, {r['subject']['source'].split(' (')[0]})", fontsize=10)
        save(fig, "bench_depth.png")
    if "mixed" in r:
        x = r["mixed"]
        ms = x["step_ms"]
        D, h = x["deep"], x["rows"] // 2
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
        labels = [f"{x['rows']}x d{D}", f"mixed\n{h}x d{D} + {h}x d1", "predicted\n(active rows)", "separately\n(2 steps)", f"{x['rows']}x d1"]
        vals = [ms["deep32"], ms["mixed"], x["predicted_ms"], x["separately_ms"], ms["shallow32"]]
        ax.bar(labels, vals, color=["C3", "C0", "C2", "C1", "C7"])
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"mixed / predicted = {x['cost_ratio']:.2f}", fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        a = x["admission"]
        ax2.bar([str(y["loops"]) for y in a["rows"]], [y["admitted"] for y in a["rows"]], color="C4")
        ax2.set_xlabel("loops")
        ax2.set_ylabel("requests admitted")
        ax2.set_title(f"{a['budget_mb']:g} MiB KV, {a['prompt_len']}+{a['max_tokens']} tokens each", fontsize=10)
        ax2.tick_params(axis="x", labelsize=7)
        save(fig, "bench_mixed.png")
    if "serving" in r:
        s = r["serving"]
        conc = [lv for lv in s["levels"] if lv["kind"] == "concurrency"]
        rate = [lv for lv in s["levels"] if lv["kind"] == "rate"]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        if conc:
            cs = [lv["concurrency"] for lv in conc]
            ax.plot(cs, [lv["output_throughput"] for lv in conc], "o-", label="output tok/s")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("max concurrency")
            ax.set_ylabel("output tokens/s")
            axb = ax.twinx()
            axb.plot(cs, [lv["tpot_ms"]["median"] for lv in conc], "s--", color="C1", label="median TPOT ms")
            axb.set_ylabel("median TPOT (ms)")
            ax.set_title("max-concurrency sweep", fontsize=10)
            ax.legend(loc="upper left", fontsize=7)
            axb.legend(loc="lower right", fontsize=7)
        if rate:
            rs = [lv["rate"] for lv in rate]
            ax2.plot(rs, [lv["ttft_ms"]["median"] for lv in rate], "o-", label="TTFT median")
            ax2.plot(rs, [lv["ttft_ms"]["p99"] for lv in rate], "o:", label="TTFT p99")
            ax2.plot(rs, [lv["itl_ms"]["median"] for lv in rate], "s-", label="ITL median")
            ax2.plot(rs, [lv["itl_ms"]["p99"] for lv in rate], "s:", label="ITL p99")
            ax2.set_xlabel("Poisson arrival rate (requests/s)")
            ax2.set_ylabel("ms")
            ax2.set_yscale("log")
            ax2.set_title("Poisson arrivals", fontsize=10)
            ax2.legend(fontsize=7)
        save(fig, "bench_serving.png")
    return written
