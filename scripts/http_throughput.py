"""Output tokens/s of a running server through HTTP, at a few concurrency levels and depths.

    make serve &                                              # or: python -m server --model DIR
    python scripts/http_throughput.py                         # 1 and 16 concurrent, loops 1 and 4
    python scripts/http_throughput.py --url http://127.0.0.1:8000 --concurrency 1 4 16 --loops 2 \
        --requests 32 --max-tokens 128 --out /tmp/throughput.json

Each request is a greedy completion of `--max-tokens` tokens (`ignore_eos`, so every request has the
same length) through POST /v1/completions, `--requests` of them kept `--concurrency` in flight
(benchmarks/loadgen.py, one connection per request). Reported:
aggregate output tokens/s (all completion tokens / wall time; with `--repeat N` the median of N runs),
per-request tokens/s (median of each request's completion tokens / its latency), and errors. A short
warm-up request before each run is not counted.
This is a quick check, not the full load benchmark (vLLM benchmark_serving style) of benchmarks/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request

from benchmarks.loadgen import offer, send

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


async def run(url: str, concurrency: int, requests: int, body: dict) -> dict:
    await send(url, {**body, "max_tokens": 4})  # warm-up
    t = time.perf_counter()
    results = await offer(url, [body] * requests, concurrency=concurrency)
    wall = time.perf_counter() - t
    done = [(r["usage"]["completion_tokens"], r["end"] - r["start"]) for r in results if r["ok"]]
    tokens = sum(n for n, _ in done)
    per_request = [n / s for n, s in done if s > 0]
    return {
        "concurrency": concurrency, "loops": body["loops"], "requests": requests, "max_tokens": body["max_tokens"],
        "wall_s": round(wall, 3), "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "per_request_tokens_per_s": round(statistics.median(per_request), 1) if per_request else 0.0,
        "errors": len(results) - len(done),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="requests in flight")
    p.add_argument("--loops", type=int, nargs="+", default=[1, 4], help="recursion depths to measure")
    p.add_argument("--requests", type=int, default=None, help="requests per measurement (default 2x concurrency, at least 4)")
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    p.add_argument("--prompt", default=PROMPT, help="the prompt of every request")
    p.add_argument("--repeat", type=int, default=1, help="measure each setting this many times; report the median")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.repeat < 1 or (args.requests is not None and args.requests < 1):
        p.error("--concurrency, --requests, --repeat and --max-tokens must be >= 1")
    try:
        with urllib.request.urlopen(args.url + "/v1/models", timeout=10) as r:
            model = json.load(r)["data"][0]
    except (OSError, KeyError, ValueError) as e:
        print(f"http_throughput: error: no server at {args.url} ({e})", file=sys.stderr)
        return 2
    results = []
    print(f"model {model['id']} ({model['layout']}, {model['scheme']}) at {args.url}")
    print(f"{'loops':>5} {'concurrency':>11} {'requests':>8} {'tokens/s':>9} {'per request':>11} {'errors':>6}")
    for loops in args.loops:
        for c in args.concurrency:
            body = {"model": model["id"], "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "loops": loops}
            runs = [asyncio.run(run(args.url, c, args.requests or max(4, 2 * c), body)) for _ in range(args.repeat)]
            r = sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]  # the median run
            r = {**r, "errors": sum(x["errors"] for x in runs), "tokens_per_s_runs": [x["tokens_per_s"] for x in runs]}
            results.append(r)
            print(f"{loops:>5} {c:>11} {r['requests']:>8} {r['tokens_per_s']:>9.1f} {r['per_request_tokens_per_s']:>11.1f} {r['errors']:>6}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "results": results}, f, indent=2)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
