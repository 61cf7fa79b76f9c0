"""Faults: an exception while computing one request (a raising sampler, a raising detokenizer) fails only
that request, with a 500-class body or an error event, while the requests in the same batch finish
with the right text; the per-request timeout (408 / error event) frees the request's row; and when the
engine loop itself dies, every request still waiting gets an error, /health turns 503, and a real
server process exits with status 1 instead of hanging.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx
import pytest

from server import Engine, EngineConfig, SamplingParams
from server.engine import sampler as sampling
from server.api.app import create_app
from server.engine.detokenizer import Detokenizer
from server_fixtures import reference_greedy, same_greedy

PROMPTS = ["First Citizen:", "All: Speak"]
POISON_T = 1.25  # requests sampled at this temperature get the injected sampler fault


def arun(app, fn, timeout: float = 60):
    """Runs `await fn(client)` against the app (lifespan entered) in a fresh event loop, bounded in time."""
    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
                return await asyncio.wait_for(fn(c), timeout)
    return asyncio.run(go())


def sse(text: str) -> list:
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture
def faulty_sampler(monkeypatch):
    """Sampling raises, from its third token on, in every batch that holds a row sampled at POISON_T."""
    poisoned, uses = set(), collections.Counter()
    real_generator, real_race = SamplingParams.generator, sampling.exponential_race

    def generator(self, device, offset=0):
        g = real_generator(self, device, offset)
        if self.temperature == POISON_T:
            poisoned.add(id(g))
        return g

    def race(probs, generators):
        for g in generators:
            if id(g) in poisoned:
                uses[id(g)] += 1
                if uses[id(g)] >= 3:
                    raise RuntimeError("injected sampler fault")
        return real_race(probs, generators)

    monkeypatch.setattr(SamplingParams, "generator", generator)
    monkeypatch.setattr(sampling, "exponential_race", race)


@pytest.fixture
def faulty_detokenizer(monkeypatch):
    """The detokenizer of a sequence with the stop string "BOOM" raises at its fourth token."""
    real_add = Detokenizer.add

    def add(self, token_id):
        if "BOOM" in self.stop and len(self.ids) >= 7:
            raise UnicodeError("injected detokenizer fault")
        return real_add(self, token_id)

    monkeypatch.setattr(Detokenizer, "add", add)


def test_a_fault_in_one_row_fails_only_that_row(engine, faulty_sampler, faulty_detokenizer):
    """Engine level, stepped by hand: all five sequences share the prefill and every decode batch."""
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [engine.encode(p) for p in PROMPTS]
    ok = engine.add_request(ids, greedy, loops=4) + engine.add_request(ids[:1], greedy, loops=1)
    bad = engine.add_request(ids[:1], SamplingParams(temperature=POISON_T, seed=1, max_tokens=20), loops=2)
    bad += engine.add_request(ids[1:], SamplingParams(temperature=0, max_tokens=20, stop=("BOOM",)), loops=3)
    errors = {}
    while engine.has_work():
        for out in engine.step():
            if out.error:
                errors[out.seq.id] = out.error
    assert errors == {bad[0].id: "RuntimeError: injected sampler fault", bad[1].id: "UnicodeError: injected detokenizer fault"}
    assert [s.finish_reason for s in bad] == ["error", "error"] and len(bad[0].output_ids) == 2
    for seq in ok:
        assert seq.finish_reason == "length"
        assert same_greedy(seq.output_ids, reference_greedy(engine.model, seq.prompt_ids, seq.loops, 20)), seq
    assert engine.scheduler.running == [] and engine.blocks.num_used == 0 and engine.num_waiting == 0


def test_a_failing_request_is_a_5xx_or_error_event_and_its_neighbours_succeed(engine, faulty_sampler):
    app = create_app(engine, stop_engine_on_shutdown=False)
    ids = engine.encode(PROMPTS[0])
    good = {"prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "loops": 3}
    poison = {"prompt": ids, "max_tokens": 24, "temperature": POISON_T, "seed": 7, "loops": 2}

    async def go(c):
        return await asyncio.gather(c.post("/v1/completions", json=good), c.post("/v1/completions", json={**good, "stream": True}),
                                    c.post("/v1/completions", json=poison), c.post("/v1/completions", json={**poison, "stream": True}))

    a, b, c, d = arun(app, go)
    ref = engine.decode(reference_greedy(engine.model, ids, 3, 24)[0])
    assert a.status_code == 200 and a.json()["choices"][0]["text"] == ref
    assert b.status_code == 200 and "".join(e["choices"][0]["text"] for e in sse(b.text)) == ref
    assert c.status_code == 500 and c.json()["error"] == {"message": "generation failed: RuntimeError: injected sampler fault",
                                                          "type": "internal_error", "param": None, "code": None}
    *chunks, last = sse(d.text)
    assert last["error"]["type"] == "internal_error" and "injected sampler fault" in last["error"]["message"]
    assert all("error" not in e for e in chunks)
    assert arun(app, lambda c: c.get("/health")).status_code == 200


def test_request_timeout_aborts_and_frees_the_row(engine, monkeypatch):
    real_decode = engine.runner.decode

    def slow_decode(seqs):
        time.sleep(0.02)
        return real_decode(seqs)

    monkeypatch.setattr(engine.runner, "decode", slow_decode)
    app = create_app(engine, stop_engine_on_shutdown=False, request_timeout=0.5)
    body = {"prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    async def go(c):
        t0 = time.perf_counter()
        plain, streamed, quick = await asyncio.gather(
            c.post("/v1/completions", json=body), c.post("/v1/completions", json={**body, "stream": True}),
            c.post("/v1/completions", json={**body, "max_tokens": 3}))
        took = time.perf_counter() - t0
        for _ in range(100):  # the aborted rows leave at the next step
            m = (await c.get("/metrics")).text
            if "mesh_requests_running 0.0" in m.splitlines():
                break
            await asyncio.sleep(0.02)
        return plain, streamed, quick, took, m

    plain, streamed, quick, took, metrics = arun(app, go)
    assert 0.5 <= took < 60, took  # it waited for the deadline, and did not hang (a hang guard, not a speed test)
    assert plain.status_code == 408 and plain.json()["error"]["code"] == "request_timeout" and "0.5 s" in plain.json()["error"]["message"]
    *chunks, last = sse(streamed.text)
    assert chunks and last["error"]["type"] == "timeout_error"
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 3
    lines = metrics.splitlines()
    assert "mesh_requests_running 0.0" in lines and "mesh_kv_cache_usage_ratio 0.0" in lines
    assert 'mesh_requests_total{finish_reason="",status="408"} 2.0' in lines


def test_when_the_engine_loop_dies_every_request_ends_and_health_is_503(ckpt, monkeypatch):
    engine = Engine(EngineConfig(model=ckpt))
    app = create_app(engine)
    real_schedule = engine.scheduler.schedule

    def schedule():  # the loop itself breaks (outside any one request's computation) ...
        if any(s.params.max_tokens == 13 for s in engine.scheduler.waiting):
            raise MemoryError("injected engine-loop fault")
        return real_schedule()

    def finish(seq, reason):  # ... and so does the bookkeeping it would use to end the requests
        raise RuntimeError("broken bookkeeping")

    real_decode = engine.runner.decode

    def slow_decode(seqs):  # the long requests are still running when the loop breaks
        time.sleep(0.01)
        return real_decode(seqs)

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    monkeypatch.setattr(engine.runner, "decode", slow_decode)
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "loops": 4}

    async def go(c):
        streaming = asyncio.ensure_future(c.post("/v1/completions", json={**body, "stream": True}))
        plain = asyncio.ensure_future(c.post("/v1/completions", json=body))
        while not (len(engine.scheduler.running) == 2 and min(len(s.output_ids) for s in engine.scheduler.running) >= 2):
            await asyncio.sleep(0.005)  # both are decoding
        monkeypatch.setattr(engine.scheduler, "finish", finish)
        poison = await c.post("/v1/completions", json={**body, "max_tokens": 13})
        return poison, await plain, await streaming, await c.get("/health"), await c.post("/v1/completions", json=body)

    poison, plain, streamed, health, after = arun(app, go, timeout=30)  # nothing hangs
    events = [e[len("data: "):] for e in streamed.text.split("\n\n") if e]
    assert isinstance(engine.error, MemoryError) and not engine.alive
    assert poison.status_code == 500 and "engine stopped: MemoryError: injected engine-loop fault" in poison.json()["error"]["message"]
    assert plain.status_code == 500
    assert events[-1] == "[DONE]" and "engine stopped" in json.loads(events[-2])["error"]["message"]
    assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
    assert after.status_code == 503


ENGINE_DIES = """
import sys
from server import __main__ as cli
from server.engine.scheduler import Scheduler
real = Scheduler.schedule
def schedule(self):
    if any(s.params.max_tokens == 13 for s in self.waiting):
        raise MemoryError("injected engine-loop fault")
    return real(self)
Scheduler.schedule = schedule
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_real_server_exits_nonzero_when_its_engine_dies(serve, ckpt):
    server = serve(["--model", str(ckpt), "--log-level", "warning"], code=ENGINE_DIES)
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 13}, timeout=30)
    assert r.status_code == 500 and "injected engine-loop fault" in r.json()["error"]["message"]
    assert server.proc.wait(timeout=30) == 1, server.log()
    log = server.log()
    assert "the engine thread died: shutting down" in log
    assert log.strip().splitlines()[-1] == "python -m server: error: the engine stopped (MemoryError: injected engine-loop fault)"
