"""Graceful shutdown of a real `python -m server` (uvicorn) subprocess: on SIGTERM it stops admitting (new
connections refused, a kept-alive one closed or answered 503), finishes the requests in flight, streams
included, and exits 0; past --shutdown-grace the remaining requests are cut and it exits anyway.

Decode steps are slowed to 10 ms (a wrapper around the same CLI) so requests are surely in flight.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
from starlette.testclient import TestClient

from server import Engine, EngineConfig
from server.api.app import create_app

SLOW = """
import sys, time
from server import __main__ as cli
from server.engine.model_runner import ModelRunner
real = ModelRunner.decode
def decode(self, seqs):
    time.sleep(0.01)
    return real(self, seqs)
ModelRunner.decode = decode
sys.exit(cli.main(sys.argv[1:]))
"""
BODY = {"prompt": "First Citizen:", "temperature": 0, "ignore_eos": True, "loops": 2}


async def read_stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> dict:
    """Reads an SSE completion; returns its chunks and whether [DONE] came (False when the server cut it)."""
    chunks, done = [], False
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    started.set()
    except httpx.RemoteProtocolError:  # the connection closed mid-stream
        pass
    return {"chunks": chunks, "done": done, "ended": time.perf_counter()}


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(serve, ckpt):
    server = serve(["--model", str(ckpt), "--shutdown-grace", "30", "--log-level", "info"], code=SLOW)
    N = 120  # tokens per request: about 1.5 s of decoding at 10 ms a step

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c, \
                   httpx.AsyncClient(base_url=server.url, timeout=10) as kept:
            assert (await kept.get("/health")).status_code == 200  # an idle kept-alive connection
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.ensure_future(read_stream(c, {**BODY, "max_tokens": N}, e)) for e in started]
            plain = asyncio.ensure_future(c.post("/v1/completions", json={**BODY, "max_tokens": N}))
            for e in started:
                await e.wait()
            await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            sent = time.perf_counter()
            await asyncio.sleep(0.3)
            refused = []
            try:  # a new connection
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
                    refused.append((await fresh.post("/v1/completions", json={**BODY, "max_tokens": 2})).status_code)
            except httpx.ConnectError:
                refused.append("refused")
            try:  # a request on the kept-alive connection
                refused.append((await kept.post("/v1/completions", json={**BODY, "max_tokens": 2})).status_code)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                refused.append("closed")
            return sent, refused, await asyncio.gather(*streams), await plain

    sent, refused, streams, plain = asyncio.run(go())
    code = server.proc.wait(timeout=30)
    exited = time.perf_counter()
    assert code == 0, server.log()
    print("after SIGTERM:", refused)
    assert refused[0] in ("refused", 503) and refused[1] in ("closed", 503), refused
    for s in streams:  # every stream ran to its end after SIGTERM
        assert s["done"] and s["chunks"][-1]["usage"]["completion_tokens"] == N, s["chunks"][-1:]
        assert s["chunks"][-2]["choices"][0]["finish_reason"] == "length" and s["ended"] - sent > 0.3
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == N
    assert exited >= max(s["ended"] for s in streams)
    log = server.log()
    assert "Shutting down" in log and "Traceback" not in log


def test_the_grace_period_bounds_the_drain(serve, ckpt):
    server = serve(["--model", str(ckpt), "--shutdown-grace", "1", "--log-level", "info"], code=SLOW)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            started = asyncio.Event()
            stream = asyncio.ensure_future(read_stream(c, {**BODY, "max_tokens": 240}, started))  # ~3 s or more
            await started.wait()
            server.proc.send_signal(signal.SIGTERM)
            sent = time.perf_counter()
            code = await asyncio.to_thread(server.proc.wait, 30)
            return sent, time.perf_counter(), code, await stream

    sent, exited, code, stream = asyncio.run(go())
    assert code == 0, server.log()
    assert 1.0 <= exited - sent < 6.0, exited - sent
    assert not stream["done"] and len(stream["chunks"]) < 240, "the stream was cut at the end of the grace period"
    assert "timeout graceful shutdown exceeded" in server.log()


def test_a_draining_app_answers_503(ckpt):
    """What a request that reaches the app after SIGTERM (on a kept-alive connection) gets."""
    engine = Engine(EngineConfig(model=ckpt), metrics=False)
    app = create_app(engine)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        app.state.draining = True
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json={**BODY, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
