"""One load generator for the benchmarks, the scripts and the load tests: a stdlib asyncio HTTP/1.1
client (one connection per request) and three ways to offer requests to a server.

    results = asyncio.run(offer(url, bodies, concurrency=16))           # at most 16 in flight
    results = asyncio.run(offer(url, bodies, rate=4.0, seed=0))         # Poisson arrivals, 4 req/s
    results = asyncio.run(offer(url, bodies, cancel_after=[None, 0.1])) # the 2nd client leaves after 0.1 s
    results = asyncio.run(closed_loop(url, next_body, clients_at, 60))  # clients that follow a ramp

Each result is a dict: status (0 when no HTTP answer came), ok, error (message) and error_type, texts
and reasons (one per choice; streams reassembled), usage, done ([DONE] seen, or a complete JSON body),
retry_after, and perf_counter times: start, chunks (each text chunk of a stream), end. A request never
raises: a refused connection, a reset or bad JSON is an error in its result.

The client is stdlib on purpose: it shares the machine's cores with the server, and httpx's streaming
machinery used as much CPU as the server itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from urllib.parse import urlsplit

COMPLETIONS = "/v1/completions"


async def _post(host: str, port: int, path: str, body: dict, headers: dict | None):
    """Sends one HTTP/1.1 POST (Connection: close); returns (status, headers, reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    head = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        head[name.strip().lower()] = value.strip()
    return status, head, reader, writer


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


def _fail(res: dict, error: dict | str) -> dict:
    if isinstance(error, dict):
        res["error"], res["error_type"] = error.get("message") or "error", error.get("type")
    else:
        res["error"] = error
    return res


def _add_choices(res: dict, choices: list[dict]) -> None:
    for c in choices:
        i = c.get("index", 0)
        res["texts"][i] += c.get("text") or ""
        res["reasons"][i] = c.get("finish_reason") or res["reasons"][i]


async def _read_events(res: dict, headers: dict, reader) -> None:
    """Reassembles an SSE completion stream into `res`: texts, reasons, usage, chunk times, done."""
    buf = b""
    async for part in _body_parts(headers, reader):
        buf += part
        while b"\n\n" in buf:  # one SSE event per blank-line-terminated block
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                res["done"] = True
                continue
            obj = json.loads(data)
            if "error" in obj:  # an error event: the stream failed after its 200
                _fail(res, obj["error"])
                return
            if any(c.get("text") for c in obj.get("choices", [])):
                res["chunks"].append(time.perf_counter())
            _add_choices(res, obj.get("choices", []))
            res["usage"] = obj.get("usage") or res["usage"]


async def send(url: str, body: dict, path: str = COMPLETIONS, headers: dict | None = None) -> dict:
    """POSTs one request (streamed when body["stream"]); returns its result dict (see the module doc)."""
    n = body.get("n", 1) if isinstance(body.get("n", 1), int) else 1
    res = {"status": 0, "ok": False, "error": None, "error_type": None, "texts": [""] * n, "reasons": [None] * n,
           "usage": None, "done": False, "retry_after": None, "chunks": [], "start": time.perf_counter()}
    where = urlsplit(url)
    writer = None
    try:
        res["status"], head, reader, writer = await _post(where.hostname, where.port, path, body, headers)
        res["retry_after"] = head.get("retry-after")
        if res["status"] == 200 and "text/event-stream" in head.get("content-type", ""):
            await _read_events(res, head, reader)
        else:
            raw = b"".join([part async for part in _body_parts(head, reader)])
            obj = json.loads(raw) if raw else {}
            if res["status"] != 200:
                return _fail(res, obj.get("error") or f"HTTP {res['status']}: {raw[:200]!r}")
            _add_choices(res, obj.get("choices", []))
            res["usage"], res["done"] = obj.get("usage"), True
        if not res["done"] and res["error"] is None:
            _fail(res, "the stream ended without [DONE]")
        res["ok"] = res["error"] is None
    except Exception as e:  # refused, reset, a cut stream, bad JSON: counted, never raised
        _fail(res, f"{type(e).__name__}: {e}")
    finally:
        res["end"] = time.perf_counter()
        if writer is not None:
            writer.close()  # also what a client that goes away does: the server sees the disconnect
    return res


async def _send_or_leave(url: str, body: dict, leave_after: float | None) -> dict:
    """send(), or a client that goes away after `leave_after` s if no answer came by then."""
    task = asyncio.ensure_future(send(url, body))
    if leave_after is None:
        return {**await task, "cancelled": False}
    done, _ = await asyncio.wait({task}, timeout=leave_after)
    if done:
        return {**task.result(), "cancelled": False}
    task.cancel()  # closes its connection mid-request
    try:
        await task
    except asyncio.CancelledError:
        pass
    return {"status": 0, "ok": False, "error": "cancelled by the client", "cancelled": True}


async def offer(url: str, bodies: list[dict], *, concurrency: int | None = None, rate: float | None = None,
                seed: int = 0, cancel_after: list[float | None] | None = None, deadline_s: float = 600.0) -> list[dict]:
    """Offers `bodies` (in order): all at once with at most `concurrency` in flight, or as a Poisson process
    at `rate` requests/s. `cancel_after[i]`: client i leaves after that many seconds (None: it waits).
    Requests still unanswered after `deadline_s` end as errors ("deadline"), so a level never hangs."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    leave = cancel_after or [None] * len(bodies)

    async def one(body: dict, leave_after: float | None) -> dict:
        if sem is None:
            return await _send_or_leave(url, body, leave_after)
        async with sem:  # max concurrency: the clock starts when the request is actually sent
            return await _send_or_leave(url, body, leave_after)

    tasks = []
    for body, leave_after in zip(bodies, leave):
        if rate:
            await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        tasks.append(asyncio.ensure_future(one(body, leave_after)))
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [t.result() if t in done else {"status": 0, "ok": False, "error": "deadline"} for t in tasks]


async def closed_loop(url: str, next_body, clients_at, duration_s: float, max_clients: int) -> list[dict]:
    """Closed-loop clients: client i sends next_body(), waits for the answer, and repeats while
    i < clients_at(seconds since the start), for `duration_s` seconds. A 429 makes that client wait its
    Retry-After (at most 2 s). Returns every result, each with its "body"."""
    results: list[dict] = []
    t0 = time.monotonic()

    async def client(i: int) -> None:
        while (elapsed := time.monotonic() - t0) < duration_s:
            if i >= clients_at(elapsed):
                await asyncio.sleep(0.2)
                continue
            body = next_body()
            res = await send(url, body)
            results.append({**res, "body": body})
            if res["status"] == 429:
                await asyncio.sleep(min(float(res["retry_after"] or 1), 2.0))

    await asyncio.gather(*(client(i) for i in range(max_clients)))
    return results


def level_stats(results: list[dict], duration_s: float) -> dict:
    """vLLM benchmark_serving's figures of one level, over the results that are ok: request and output
    throughput (usage tokens / wall time), TTFT (sent -> first text chunk), TPOT ((latency - TTFT) /
    (tokens - 1)) and ITL (gaps between text chunks) in ms, each mean / median / p99, and the errors."""
    from .common import summary

    ok = [r for r in results if r["ok"]]
    tokens = [r["usage"]["completion_tokens"] if r.get("usage") else 0 for r in ok]
    ttft = [1e3 * (r["chunks"][0] - r["start"]) for r in ok if r["chunks"]]
    tpot = [1e3 * (r["end"] - r["chunks"][0]) / (n - 1) for r, n in zip(ok, tokens) if n > 1 and r["chunks"]]
    itl = [1e3 * (b - a) for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(errors), "error_examples": errors[:3],
        "duration_s": duration_s, "request_throughput": len(ok) / duration_s, "output_throughput": sum(tokens) / duration_s,
        "output_tokens": sum(tokens), "text_chunks_per_token": sum(len(r["chunks"]) for r in ok) / max(1, sum(tokens)),
        "ttft_ms": summary(ttft), "tpot_ms": summary(tpot), "itl_ms": summary(itl),
    }
