"""4. Serving load against a real server, in the style of vLLM's `benchmark_serving.py`.

`python -m server` runs as a subprocess (benchmarks/harness.py: uvicorn on 127.0.0.1, a free port,
the same thread count), and benchmarks/loadgen.py streams `POST /v1/completions` requests
(`stream: true`, usage included, `ignore_eos` so every request makes exactly max_tokens tokens,
greedy; one connection per request), their depths `loops` cycling through 1..max_loops in a seeded
shuffle. Two sweeps:

- max concurrency 1, 4, 16, 32, 64: requests are all offered at once, at most c in flight;
- Poisson arrivals at several rates (requests/s), no cap on concurrency (the server's batch and
  waiting queue bound it).

Per level (the metrics vLLM reports, loadgen.level_stats): request throughput, output tokens/s,
TTFT, TPOT, ITL, each mean / median / p99, errors (a non-200 status, an error event, no [DONE], no
text chunk, or fewer tokens than asked; must be 0), and the CPU the server process and this client
used per second of the level (they share the machine). Bounded: each level has a deadline, and the
server is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .common import Subject, prompt_ids, save_subject
from .harness import ServerProcess, cpu_seconds
from .loadgen import level_stats, offer

LEVEL_DEADLINE_S = 600.0  # a level that has not finished by then is an error, not a hang


def server_args(model_dir: Path, device: str, max_batch_size: int = 64) -> list[str]:
    return ["--model", str(model_dir), "--host", "127.0.0.1", "--device", device, "--max-batch-size", str(max_batch_size),
            "--kv-cache-mb", "2048", "--max-waiting", "1024", "--log-level", "warning"]


def checked(res: dict, max_tokens: int) -> dict:
    """A streamed result counts only when it made every token asked for, in text chunks."""
    if not res["ok"]:
        return res
    tokens = (res.get("usage") or {}).get("completion_tokens", 0)
    if tokens != max_tokens:
        return {**res, "ok": False, "error": f"{tokens} tokens instead of {max_tokens}"}
    if not res["chunks"]:
        return {**res, "ok": False, "error": "no text chunk"}
    return res


def run_level(url: str, bodies: list[dict], concurrency: int | None, rate: float | None, seed: int) -> dict:
    t0 = time.perf_counter()
    results = asyncio.run(offer(url, bodies, concurrency=concurrency, rate=rate, seed=seed, deadline_s=LEVEL_DEADLINE_S))
    duration = time.perf_counter() - t0
    return level_stats([checked(r, b["max_tokens"]) for r, b in zip(results, bodies)], duration)


def run(subject: Subject, plan: dict, threads: int = 1, device: str = "cpu", seed: int = 0,
        quiet: bool = False, prompt_len: int = 32) -> dict:
    cfg = subject.config
    depths = list(range(1, cfg.max_loops + 1))
    max_tokens = plan["max_tokens"]
    levels = [("concurrency", c, plan["per_level"](c)) for c in plan["concurrency"]]
    levels += [("rate", r, plan["per_rate"]) for r in plan["rates"]]
    out = {"depths": depths, "prompt_len": prompt_len, "max_tokens": max_tokens, "levels": []}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        model_dir = save_subject(subject, Path(tmp) / "model")
        with ServerProcess(server_args(model_dir, device), Path(tmp) / "server.log", threads=threads) as server:
            with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
                name = json.load(r)["data"][0]["id"]
            out["server"] = "python " + " ".join(server.cmd[1:]).replace(str(model_dir), "MODEL")
            rng = random.Random(seed)

            def bodies(n: int, level_seed: int) -> list[dict]:
                prompts = prompt_ids(subject.tokenizer, n, prompt_len, cfg.vocab_size, level_seed)
                loops = [depths[i % len(depths)] for i in range(n)]
                rng.shuffle(loops)
                return [{"model": name, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                         "stream_options": {"include_usage": True}, "ignore_eos": True, "loops": k}
                        for p, k in zip(prompts, loops)]

            run_level(server.url, bodies(2, seed), 2, None, seed)  # warm-up, not reported
            for kind, x, n in tqdm(levels, desc="serving load", disable=quiet, leave=False):
                level_seed = seed + len(out["levels"]) + 1
                cpu0 = (server.cpu_seconds(), cpu_seconds())
                res = run_level(server.url, bodies(n, level_seed), x if kind == "concurrency" else None,
                                x if kind == "rate" else None, level_seed)
                # Where the cores went: the server process and this client (both Python), per second of the level.
                res["server_cpu_per_s"] = (server.cpu_seconds() - cpu0[0]) / res["duration_s"]
                res["client_cpu_per_s"] = (cpu_seconds() - cpu0[1]) / res["duration_s"]
                res.update(kind=kind, label=f"concurrency {x}" if kind == "concurrency" else f"Poisson {x:g} req/s",
                           **({"concurrency": x} if kind == "concurrency" else {"rate": x}))
                out["levels"].append(res)
                if res["errors"]:
                    print(f"serving: {res['label']}: {res['errors']} errors, e.g. {res['error_examples']}", file=sys.stderr)
            out["server_log_tail"] = server.log()[-1000:]
    by_c = {lv["concurrency"]: lv for lv in out["levels"] if lv["kind"] == "concurrency"}
    if 1 in by_c and 32 in by_c:
        out["c32_over_c1"] = by_c[32]["output_throughput"] / by_c[1]["output_throughput"]
    out["errors_total"] = sum(lv["errors"] for lv in out["levels"])
    return out
