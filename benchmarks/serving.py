"""4. Serving load against a real server, in the style of vLLM's `benchmark_serving.py`.

`python -m server` runs as a subprocess (uvicorn on 127.0.0.1, a free port, the same thread count),
and an asyncio client streams `POST /v1/completions` requests (`stream: true`, usage included,
`ignore_eos` so every request makes exactly max_tokens tokens, greedy; a stdlib asyncio HTTP/1.1
client, one connection per request), their depths `loops` cycling
through 1..max_loops in a seeded shuffle. Two sweeps:

- max concurrency 1, 4, 16, 32, 64: requests are all offered at once, at most c in flight;
- Poisson arrivals at several rates (requests/s), no cap on concurrency (the server's batch and
  waiting queue bound it).

Per level (the metrics vLLM reports): request throughput, output tokens/s (usage tokens over the
level's wall time), TTFT (request sent -> first text chunk), TPOT ((latency - TTFT) / (tokens - 1)
per request), ITL (gaps between successive text chunks), each mean / median / p99, errors
(a non-200 status, an error event, no [DONE], or fewer tokens than asked; must be 0), and the CPU
the server process and this client used per second of the level (they share the machine).
Bounded: each level has a deadline, and the server is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from .common import ROOT, Subject, prompt_ids, save_subject, summary

LEVEL_DEADLINE_S = 600.0  # a level that has not finished by then is an error, not a hang
STARTUP_S = 180.0


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when pid is None), all threads."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m server` in a subprocess; a context manager that always stops it."""

    def __init__(self, model_dir: Path, threads: int, device: str, log_path: Path, max_batch_size: int = 64):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
                    "--port", str(self.port), "--device", device, "--max-batch-size", str(max_batch_size),
                    "--kv-cache-mb", "2048", "--max-waiting", "1024", "--threads", str(threads), "--log-level", "warning"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health within {STARTUP_S:.0f} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")[-n:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


async def one_request(host: str, port: int, body: dict, sem: asyncio.Semaphore | None) -> dict:
    if sem is None:
        return await stream_completion(host, port, body)
    async with sem:  # max concurrency: the clock starts when the request is actually sent
        return await stream_completion(host, port, body)


async def _http_post(host: str, port: int, path: str, body: dict):
    """Sends one HTTP/1.1 POST; returns (status, headers, reader, writer). A stdlib client: it shares the
    2 cores with the server, and httpx's streaming machinery cost as much CPU as the server itself."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader, writer


async def _body_parts(headers: dict, reader):
    """The response body as it arrives (chunked transfer encoding, or up to the connection's end)."""
    if "chunked" not in headers.get("transfer-encoding", ""):
        yield await reader.read()
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def stream_completion(host: str, port: int, body: dict) -> dict:
    """Streams one completion; returns its timings (perf_counter seconds) or an error."""
    res = {"ok": False, "tokens": 0, "chunks": [], "error": None}
    writer = None
    try:
        res["start"] = time.perf_counter()
        status, headers, reader, writer = await _http_post(host, port, "/v1/completions", body)
        if status != 200:
            res["error"] = f"HTTP {status}: {(await reader.read())[:200]!r}"
            return res
        done, buf = False, b""
        async for part in _body_parts(headers, reader):
            buf += part
            while b"\n\n" in buf:  # one SSE event per blank-line-terminated block
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    res["error"] = obj["error"].get("message", "error event")
                    return res
                if obj.get("choices") and obj["choices"][0].get("text"):
                    res["chunks"].append(time.perf_counter())
                if obj.get("usage"):
                    res["tokens"] = obj["usage"]["completion_tokens"]
        res["end"] = time.perf_counter()
        if not done:
            res["error"] = "the stream ended without [DONE]"
        elif res["tokens"] != body["max_tokens"]:
            res["error"] = f"{res['tokens']} tokens instead of {body['max_tokens']}"
        elif not res["chunks"]:
            res["error"] = "no text chunk"
        else:
            res["ok"] = True
        return res
    except Exception as e:  # connection reset, bad JSON, a cut stream: counted, never raised
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        if writer is not None:
            writer.close()


async def run_level(url: str, bodies: list[dict], concurrency: int | None, rate: float | None, seed: int) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    for body in bodies:
        if rate:
            await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        tasks.append(asyncio.create_task(one_request(host, int(port), body, sem)))
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), LEVEL_DEADLINE_S)
    except asyncio.TimeoutError:
        for t in tasks:
            t.cancel()
        results = [t.result() if t.done() and not t.cancelled() else {"ok": False, "error": "deadline"} for t in tasks]
    duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [1e3 * (r["chunks"][0] - r["start"]) for r in ok]
    tpot = [1e3 * (r["end"] - r["chunks"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    itl = [1e3 * (b - a) for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(errors), "error_examples": errors[:3],
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_throughput": tokens / duration,
        "output_tokens": tokens, "text_chunks_per_token": sum(len(r["chunks"]) for r in ok) / max(1, tokens),
        "ttft_ms": summary(ttft), "tpot_ms": summary(tpot), "itl_ms": summary(itl),
    }


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
        with Server(model_dir, threads, device, Path(tmp) / "server.log") as server:
            import httpx

            name = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            out["server"] = "python " + " ".join(server.cmd[1:]).replace(str(model_dir), "MODEL")
            rng = random.Random(seed)

            def bodies(n: int, level_seed: int) -> list[dict]:
                prompts = prompt_ids(subject.tokenizer, n, prompt_len, cfg.vocab_size, level_seed)
                loops = [depths[i % len(depths)] for i in range(n)]
                rng.shuffle(loops)
                return [{"model": name, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                         "stream_options": {"include_usage": True}, "ignore_eos": True, "loops": k}
                        for p, k in zip(prompts, loops)]

            asyncio.run(run_level(server.url, bodies(2, seed), 2, None, seed))  # warm-up, not reported
            for kind, x, n in tqdm(levels, desc="serving load", disable=quiet, leave=False):
                level_seed = seed + len(out["levels"]) + 1
                cpu0 = (cpu_seconds(server.proc.pid), cpu_seconds())
                res = asyncio.run(run_level(server.url, bodies(n, level_seed), x if kind == "concurrency" else None,
                                            x if kind == "rate" else None, level_seed))
                # Where the 2 cores went: the server process and this client (both Python), per second of the level.
                res["server_cpu_per_s"] = (cpu_seconds(server.proc.pid) - cpu0[0]) / res["duration_s"]
                res["client_cpu_per_s"] = (cpu_seconds() - cpu0[1]) / res["duration_s"]
                res.update(kind=kind, label=f"concurrency {x}" if kind == "concurrency" else f"Poisson {x:g} req/s",
                           **({"concurrency": x} if kind == "concurrency" else {"rate": x}))
                out["levels"].append(res)
                if res["errors"]:
                    print(f"serving: {res['label']}: {res['errors']} errors, e.g. {res['error_examples']}", file=sys.stderr)
            out["server_log_tail"] = server.tail(1000)
    by_c = {lv["concurrency"]: lv for lv in out["levels"] if lv["kind"] == "concurrency"}
    if 1 in by_c and 32 in by_c:
        out["c32_over_c1"] = by_c[32]["output_throughput"] / by_c[1]["output_throughput"]
    out["errors_total"] = sum(lv["errors"] for lv in out["levels"])
    return out
