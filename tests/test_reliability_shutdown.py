"""Graceful shutdown of a real `python -m server` (uvicorn) subprocess: on SIGTERM it stops admitting (new
connections refused; a request that reaches the app on a connection opened before, our 503 body),
finishes the requests in flight, streams included, and exits 0; past --shutdown-grace the remaining
requests are cut and it exits anyway.

Engine steps are slowed to >= 10 ms (server_fixtures.SLOW_STEPS, a wrapper around the same CLI) so
requests are surely in flight.
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
from server_fixtures import SLOW_STEPS

BODY = {"prompt": "First Citizen:", "temperature": 0, "ignore_eos": True, "loops": 2}


async def read_stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> dict:
    """Reads an SSE completion; returns its chunks (with arrival times) and whether [DONE] came."""
    chunks, times, done = [], [], False
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    times.append(time.perf_counter())
                    started.set()
    except httpx.RemoteProtocolError:  # the connection closed mid-stream
        pass
    return {"chunks": chunks, "times": times, "done": done, "ended": time.perf_counter()}


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body)."""
    status = int((await reader.readline()).split()[1])
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    length = int(head.split("content-length:")[1].split("\r\n")[0])
    return status, await reader.readexactly(length)


class HalfSent:
    """A kept-alive connection (one GET /health answered on it) on which a POST's headers and half its
    body are sent now and the rest later: the request is in uvicorn's hands before SIGTERM but reaches
    the app's route only after it, as a kept-alive client's request during the drain does."""

    def __init__(self, url: str, body: dict):
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        self.payload = json.dumps(body).encode()

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        self.writer.write(f"GET /health HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        assert (await read_response(self.reader))[0] == 200
        self.writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(self.payload)}\r\n\r\n".encode() + self.payload[:5])
        await self.writer.drain()

    async def finish(self) -> tuple[int, dict]:
        """Sends the rest of the body; returns the status and the JSON body of the answer."""
        self.writer.write(self.payload[5:])
        await self.writer.drain()
        status, body = await read_response(self.reader)
        self.writer.close()
        return status, json.loads(body)


async def until_logged(server, text: str, timeout: float = 30.0) -> None:
    """Waits until the server's log contains `text` (the timeout is a hang guard only)."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.log()}"
        await asyncio.sleep(0.02)


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(serve, ckpt):
    server = serve(["--model", str(ckpt), "--shutdown-grace", "30", "--log-level", "info"], code=SLOW_STEPS)
    N = 160  # tokens per request: at least 1.6 s of decoding at >= 10 ms a step

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            kept = HalfSent(server.url, {**BODY, "max_tokens": 2})
            await kept.start()
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.ensure_future(read_stream(c, {**BODY, "max_tokens": N}, e)) for e in started]
            plain = asyncio.ensure_future(c.post("/v1/completions", json={**BODY, "max_tokens": N}))
            for e in started:
                await e.wait()
            server.proc.send_signal(signal.SIGTERM)
            sent = time.perf_counter()
            await until_logged(server, "Shutting down")  # uvicorn closes its listening socket right after
            await asyncio.sleep(0.1)
            try:  # a new connection
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
                    fresh_answer = (await fresh.post("/v1/completions", json={**BODY, "max_tokens": 2})).status_code
            except httpx.ConnectError:
                fresh_answer = "refused"
            return sent, fresh_answer, await kept.finish(), await asyncio.gather(*streams), await plain

    sent, fresh_answer, (kept_status, kept_body), streams, plain = asyncio.run(go())
    code = server.proc.wait(timeout=60)  # a hang guard only
    exited = time.perf_counter()
    assert code == 0, server.log()
    assert fresh_answer == "refused"
    # Our drain handler's answer, not uvicorn's: without it this request would be served (200).
    assert kept_status == 503 and kept_body["error"]["code"] == "shutting_down", (kept_status, kept_body)
    for s in streams:  # every stream ran to its end after SIGTERM
        assert s["done"] and s["chunks"][-1]["usage"]["completion_tokens"] == N, s["chunks"][-1:]
        assert s["chunks"][-2]["choices"][0]["finish_reason"] == "length"
        assert any(t > sent for t in s["times"]), "the stream was in flight at SIGTERM"
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == N
    assert exited >= max(s["ended"] for s in streams)
    log = server.log()
    assert "Shutting down" in log and "Traceback" not in log


def test_the_grace_period_bounds_the_drain(serve, ckpt):
    server = serve(["--model", str(ckpt), "--shutdown-grace", "1", "--log-level", "info"], code=SLOW_STEPS)
    N = 240  # >= 2.4 s of decoding: more than the grace period however fast the machine

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            started = asyncio.Event()
            stream = asyncio.ensure_future(read_stream(c, {**BODY, "max_tokens": N}, started))
            await started.wait()
            server.proc.send_signal(signal.SIGTERM)
            sent = time.perf_counter()
            code = await asyncio.to_thread(server.proc.wait, 60)  # a hang guard only
            return sent, time.perf_counter(), code, await stream

    sent, exited, code, stream = asyncio.run(go())
    assert code == 0, server.log()
    assert exited - sent >= 1.0, "the server left before the grace period was over"
    assert any(t > sent for t in stream["times"]), "the stream went on during the grace period"
    assert not stream["done"] and len(stream["chunks"]) < N, "the stream was cut at the end of the grace period"
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
