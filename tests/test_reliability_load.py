"""Load and soak against a real `python -m server` subprocess (loopback only, bounded, stops by itself).

Requests go through benchmarks/loadgen.py (the benchmarks' client). Each request draws its depth, streaming or not, greedy or seeded sampling, max_tokens, sometimes n=2
or logprobs, sometimes an invalid field (must be a 400), and sometimes a client cancellation after
a random delay. Afterwards: no 5xx, every request not cancelled completed (finish_reason, [DONE]),
every greedy answer equals the one the same request got alone, the running/waiting gauges and the
KV usage are back to 0, and the server's memory stayed within a bound.

    pytest tests/test_reliability_load.py                       # short: 200 requests, concurrency 16
    pytest tests -m soak --run-soak                             # soak: 1,000 requests, concurrency 32
                                                                # (figures in runs/soak.json, docs/RELIABILITY.md)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from benchmarks.loadgen import offer, send

ROOT = Path(__file__).resolve().parents[1]
# Greedy continuations of these are far from ties at every depth (test_server_http checks the same prompts)
GREEDY_PROMPTS = ["First Citizen:", "All: Speak"]
OTHER_PROMPTS = ["To be, or not", "The quick brown fox", "naïve café 東京 🙂", "x"]
GREEDY_TOKENS = 24
RSS_GROWTH_BOUND_MIB = 150  # peak RSS under load minus RSS after the warm-up requests


def server_args(ckpt, batch: int) -> list[str]:
    return ["--model", str(ckpt), "--max-batch-size", str(batch), "--max-waiting", "256", "--kv-cache-mb", "64",
            "--max-model-len", "128", "--log-level", "warning"]


def draw(rng: random.Random) -> dict:
    """One random request: (body, cancel-after seconds or None, expected outcome)."""
    loops = rng.randint(1, 4)
    stream = rng.random() < 0.5
    cancel = rng.uniform(0.0, 0.3) if rng.random() < 0.15 else None
    if rng.random() < 0.05:  # invalid: depth out of range or too long for max_model_len
        bad = rng.choice([{"loops": 9}, {"max_tokens": 500}, {"n": 99}, {"temperature": "hot"}])
        return {"body": {"prompt": "x", "stream": stream, **bad}, "cancel": None, "expect": 400}
    if rng.random() < 0.5:
        body = {"prompt": rng.choice(GREEDY_PROMPTS), "max_tokens": GREEDY_TOKENS, "temperature": 0, "loops": loops,
                "ignore_eos": True}
    else:
        body = {"prompt": rng.choice(GREEDY_PROMPTS + OTHER_PROMPTS), "max_tokens": rng.randint(1, 40),
                "temperature": 0.9, "top_p": rng.choice([1.0, 0.9]), "seed": rng.randrange(2**31), "loops": loops,
                "n": rng.choice([1, 1, 1, 2]), "ignore_eos": rng.random() < 0.5}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    return {"body": {**body, "stream": stream}, "cancel": cancel, "expect": 200}


def greedy_key(body: dict):
    return (body["prompt"], body["loops"]) if body.get("temperature") == 0 else None


async def run_load(server, requests: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = [draw(rng) for _ in range(requests)]
    # Reference: every greedy (prompt, depth) alone, before the load (also warms the server up).
    alone = {}
    for p in GREEDY_PROMPTS:
        for k in range(1, 5):
            body = {"prompt": p, "max_tokens": GREEDY_TOKENS, "temperature": 0, "loops": k, "ignore_eos": True}
            res = await send(server.url, body)
            assert res["ok"], res
            alone[(p, k)] = res["texts"][0]
    rss_warm = server.rss_mib()
    peak = {"rss": rss_warm}

    async def watch():
        while True:
            peak["rss"] = max(peak["rss"], server.rss_mib())
            await asyncio.sleep(0.1)

    watcher = asyncio.ensure_future(watch())
    t0 = time.perf_counter()
    # The deadline is only a hang guard: a request still open then fails its status check below.
    results = await offer(server.url, [j["body"] for j in jobs], concurrency=concurrency,
                          cancel_after=[j["cancel"] for j in jobs], deadline_s=300)
    wall = time.perf_counter() - t0
    watcher.cancel()
    results = [{**job, **res} for job, res in zip(jobs, results)]
    return {"results": results, "alone": alone, "wall": wall, "rss_warm": rss_warm, "rss_peak": peak["rss"]}


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if (m[("mesh_requests_running", ())], m[("mesh_requests_waiting", ())], m[("mesh_kv_cache_usage_ratio", ())]) == (0, 0, 0):
            return m
        if time.time() > deadline:
            pytest.fail(f"the server did not return to idle: {m}")
        time.sleep(0.05)


def check_load(server, out: dict) -> dict:
    """The assertions shared by the short load test and the soak; returns the figures."""
    results = out["results"]
    served = [r for r in results if not r["cancelled"]]
    five = [r for r in served if r["status"] >= 500 or (r["status"] == 200 and r["error"])]  # or an error event
    assert not five, f"{len(five)} 5xx, e.g. {five[0]}"
    for r in served:
        assert r["status"] == r["expect"], r
        if r["status"] != 200:
            assert r["error_type"] == "invalid_request_error" and r["error"], r
            continue
        n = r["body"].get("n", 1)
        assert r["ok"] and len(r["texts"]) == n and all(x in ("length", "stop") for x in r["reasons"]), r
        key = greedy_key(r["body"])
        if key is not None:
            assert r["texts"][0] == out["alone"][key], ("greedy text differs under load", r["body"])
    metrics = wait_idle(server)
    five_counted = sum(v for (name, labels), v in metrics.items()
                       if name == "mesh_requests_total" and dict(labels)["status"].startswith("5"))
    assert five_counted == 0
    ok = [r for r in served if r["status"] == 200]
    lat = sorted(r["end"] - r["start"] for r in ok)
    figures = {
        "requests": len(results), "completed": len(ok), "rejected_400": len(served) - len(ok),
        "cancelled": len(results) - len(served), "errors_5xx": len(five),
        "greedy_checked": sum(greedy_key(r["body"]) is not None for r in ok),
        "streamed": sum(r["body"]["stream"] for r in ok),
        "wall_s": round(out["wall"], 2), "requests_per_s": round(len(results) / out["wall"], 1),
        "latency_p50_s": round(lat[len(lat) // 2], 3), "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
        "rss_after_warmup_mib": round(out["rss_warm"], 1), "rss_peak_mib": round(out["rss_peak"], 1),
        "rss_end_mib": round(server.rss_mib(), 1),
    }
    assert figures["completed"] > 0.6 * len(results) and figures["cancelled"] > 0
    assert out["rss_peak"] - out["rss_warm"] < RSS_GROWTH_BOUND_MIB, figures
    return figures


def test_short_load_mixed_depths_streams_and_cancellations(serve, ckpt):
    server = serve(server_args(ckpt, batch=16))
    out = asyncio.run(run_load(server, requests=200, concurrency=16, seed=1))
    figures = check_load(server, out)
    print(figures)
    assert server.terminate() == 0


@pytest.mark.soak
def test_soak_1000_requests_at_concurrency_32(serve, ckpt, capsys):
    server = serve(server_args(ckpt, batch=32))
    first = asyncio.run(run_load(server, requests=200, concurrency=32, seed=2))  # the allocator settles
    check_load(server, first)
    rss_settled = server.rss_mib()
    out = asyncio.run(run_load(server, requests=1000, concurrency=32, seed=3))
    figures = check_load(server, out)
    figures.update(concurrency=32, rss_after_first_200_mib=round(rss_settled, 1),
                   command="make soak  (pytest tests -m soak --run-soak)",
                   server="python -m server " + " ".join(server_args("CKPT", 32)[2:]) + " --threads 1",
                   model="benchmarks/tiny.build_checkpoint: 1+1R2+1 mesh, d=32, random weights, CPU")
    assert figures["rss_end_mib"] - rss_settled < 50, "memory keeps growing from one batch of requests to the next"
    assert server.terminate() == 0
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    with capsys.disabled():
        print("\nsoak:", json.dumps(figures, indent=2))
