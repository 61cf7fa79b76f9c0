"""The embedded default model (model/default), as `make serve` serves it: it is the CLI's default, and its
greedy text is identical streamed and not, alone and inside a busy mixed-depth batch, and with
MeshForCausalLM.generate at the same `loops`, exactly (no near-tie allowance on the real model).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from server import Engine, EngineConfig
from server import __main__ as cli
from server.api.app import create_app
from server.engine import DEFAULT_MODEL
from server_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are accounted poor citizens", "KING RICHARD III:\nNow is the"]
N = 40


@pytest.fixture(scope="module")
def app():
    engine = Engine(EngineConfig(max_batch_size=32))
    app = create_app(engine)
    yield app
    engine.stop()


def test_the_cli_serves_the_embedded_model_by_default(monkeypatch):
    monkeypatch.delenv("MESH_MODEL", raising=False)
    assert cli.parse_args([]).model is None
    assert DEFAULT_MODEL == ROOT / "model" / "default"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (DEFAULT_MODEL / name).is_file(), name


def test_greedy_is_identical_everywhere_on_the_default_model(app):
    engine = app.state.engine
    model, max_loops = engine.model, engine.model.config.max_loops
    assert engine.model_name == "default" and max_loops >= 2
    jobs = [(p, k) for p in PROMPTS for k in range(1, max_loops + 1)]
    with torch.inference_mode():
        ref = {}
        for p, k in jobs:
            ids = engine.encode(p)
            out = model.generate(torch.tensor([ids]), loops=k, max_new_tokens=N, do_sample=False, eos_token_id=None)
            ref[(p, k)] = engine.decode(out[0, len(ids):].tolist())

    def body(p, k, **kw):
        return {"model": "default", "prompt": p, "max_tokens": N, "temperature": 0, "loops": k, "ignore_eos": True, **kw}

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
                async def text(b):
                    r = await c.post("/v1/completions", json=b)
                    assert r.status_code == 200, r.text
                    if not b.get("stream"):
                        return r.json()["choices"][0]["text"]
                    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
                    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

                alone = {job: await text(body(*job)) for job in jobs}
                streamed = {job: await text(body(*job, stream=True)) for job in jobs}
                # All at once, mixed depths, half streamed, next to sampled requests of other depths.
                noise = [body(p, 1 + i % max_loops, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS * 2)]
                busy = await asyncio.gather(*(text(body(*job, stream=i % 2 == 1)) for i, job in enumerate(jobs)),
                                            *(text(b) for b in noise))
                return alone, streamed, dict(zip(jobs, busy))

    alone, streamed, busy = asyncio.run(go())
    for job in jobs:
        assert alone[job] == streamed[job] == busy[job] == ref[job], job
    assert any(len({ref[(p, k)] for k in range(1, max_loops + 1)}) > 1 for p in PROMPTS), "loops changes nothing?"
