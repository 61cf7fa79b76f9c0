"""Adaptive per-token depth (`loops: "auto"`): each generated token stops its recursion once its state
has converged (by exit_criterion: the relative change of h, the next-token distribution's confidence, or
the KL between successive iterations), between min_loops and max_loops, inside a
continuous batch with fixed-depth and drafting rows; the K/V of the iterations it skipped are filled
from its last iteration; responses say "auto" and usage.loop_steps counts what ran.
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from server import Engine, EngineConfig, SamplingParams
from server.api.app import create_app
from server.engine import AutoDepth
from server_fixtures import reference_greedy, same_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

PROMPTS = ["First Citizen:", "All: Speak", "The quick brown fox jumps"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def run_all(engine):
    while engine.has_work():
        engine.step()


def test_auto_depth_bounds_in_a_mixed_batch(ckpt):
    """Threshold 0 never converges: every token runs max_loops and the text is depth-4 decoding. An
    unreachable threshold stops every token at min_loops. Fixed-depth rows and drafting rows in the same
    batch still give generate()'s tokens."""
    eng = Engine(EngineConfig(model=ckpt, speculative_loops=1, speculative_max_batch=64), metrics=False)
    ids = [eng.encode(p) for p in PROMPTS]
    fixed = [(k, s) for k in (4, 2, 1) for s in eng.add_request(ids, GREEDY, loops=k)]
    never = eng.add_request(ids, GREEDY, loops=AutoDepth(min_loops=1, exit_threshold=0.0))
    always = eng.add_request(ids, GREEDY, loops=AutoDepth(min_loops=2, max_loops=3, exit_threshold=1e9))
    # the criteria that read the next-token distribution: a probability never reaches 2 and a KL (clamped
    # at 0 against rounding) is never below 0, so these run max_loops and their output is the last check's logits
    never += eng.add_request(ids, GREEDY, loops=AutoDepth(exit_criterion="confidence", exit_threshold=2.0))
    never += eng.add_request(ids, GREEDY, loops=AutoDepth(exit_criterion="kl", exit_threshold=0.0))
    always += eng.add_request(ids, GREEDY, loops=AutoDepth(min_loops=2, max_loops=3, exit_criterion="confidence", exit_threshold=0.0))
    always += eng.add_request(ids, GREEDY, loops=AutoDepth(min_loops=1, max_loops=3, exit_criterion="kl", exit_threshold=1e9))
    run_all(eng)
    for k, s in fixed:
        assert same_greedy(s.output_ids, reference_greedy(eng.model, s.prompt_ids, k, GREEDY.max_tokens)), k
    for s in never:
        assert s.loops == 4 and same_greedy(s.output_ids, reference_greedy(eng.model, s.prompt_ids, 4, GREEDY.max_tokens))
        assert s.loop_steps == 4 * GREEDY.max_tokens
    for s in always:  # every token stops at 2, the first too (the prompt's last token runs as a decode step;
        # "kl" compares two iterations, so with min_loops 1 it stops at 2 as well)
        assert s.loops == 3 and s.loop_steps == 2 * GREEDY.max_tokens


def test_skipped_iterations_get_the_exit_iterations_kv(ckpt):
    eng = Engine(EngineConfig(model=ckpt), metrics=False)
    (seq,) = eng.add_request([eng.encode(PROMPTS[1])], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                             loops=AutoDepth(min_loops=1, max_loops=4, exit_threshold=1e9))
    for _ in range(5):  # the prompt but its last token, then 4 tokens that stop after iteration 1
        eng.step()
    kv, bs = eng.kv, eng.blocks.block_size
    assert seq.num_computed == len(seq.prompt_ids) + 3
    for pos in range(len(seq.prompt_ids) - 1, seq.num_computed):
        flat = lambda slot: int(seq.table[slot, pos // bs]) * bs + pos % bs  # noqa: E731
        first = kv.k_flat[flat(kv.slot[("core", 0, 0)])]
        for t in (1, 2, 3):
            assert torch.equal(kv.k_flat[flat(kv.slot[("core", 0, t)])], first), (pos, t)
    run_all(eng)


def test_auto_through_the_api(ckpt):
    eng = Engine(EngineConfig(model=ckpt))
    with TestClient(create_app(eng)) as client:
        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "loops": "auto",
                "min_loops": 2, "max_loops": 3, "exit_threshold": 1e9}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["loops"] == "auto" and r.json()["usage"]["loop_steps"] == 2 * 8
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Speak"}],
                                                         "max_tokens": 4, "loops": "auto"})
        assert chat.status_code == 200 and chat.json()["loops"] == "auto"
        for bad, param in [({"loops": 2, "min_loops": 1}, "min_loops"), ({"loops": "auto", "min_loops": 4, "max_loops": 2}, "min_loops"),
                           ({"loops": "auto", "max_loops": 9}, "max_loops"), ({"loops": "deep"}, "loops"),
                           ({"loops": "auto", "exit_threshold": -1.0}, "exit_threshold"),
                           ({"loops": "auto", "exit_criterion": "sideways"}, "exit_criterion"),
                           ({"loops": 2, "exit_criterion": "kl"}, "exit_criterion")]:
            r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        metrics = client.get("/metrics").text
    assert 'mesh_generation_tokens_total{loops="auto"} 12.0' in metrics


@pytest.mark.parametrize("auto", [AutoDepth(min_loops=0), AutoDepth(min_loops=3, max_loops=2), AutoDepth(exit_threshold=float("nan")),
                                  AutoDepth(exit_criterion="sideways")])
def test_bad_auto_settings_are_request_errors(ckpt, auto):
    from server.engine import RequestError

    eng = Engine(EngineConfig(model=ckpt), metrics=False)
    with pytest.raises(RequestError):
        eng.add_request([eng.encode(PROMPTS[0])], GREEDY, loops=auto)


@pytest.fixture(scope="module")
def coda_router_ckpt(tmp_path_factory):
    from benchmarks.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("coda") / "tiny", coda_read_routers=True)


@pytest.mark.parametrize("model", ["ckpt", "coda_router_ckpt"])
def test_forced_decoding_at_the_bounds_equals_fixed_depths(model, request):
    """benchmarks.adaptive feeds text token by token through the engine's decode path. At threshold 0 no
    token stops early: the NLL is depth 4's. When every token stops at min_loops = 2 (the skipped
    iterations filled from iteration 2's K/V, which no token reads), the NLL is depth 2's, for every
    criterion, and with per-depth coda read routers too (an exit at 2 reads with depth 2's router)."""
    from benchmarks.adaptive import forced_decode

    eng = Engine(EngineConfig(model=request.getfixturevalue(model)), metrics=False)
    windows = [eng.encode("To be, or not to be, that is the question: whether 'tis nobler")[:20],
               eng.encode("First Citizen: Before we proceed any further, hear me speak.")[:20]]
    nll = {k: forced_decode(eng, windows, k)["nll"] for k in (2, 4)}
    never = forced_decode(eng, windows, AutoDepth(exit_threshold=0.0))
    always = forced_decode(eng, windows, AutoDepth(min_loops=2, exit_threshold=1e9))
    assert never["iterations"] == 4 * never["tokens"] and never["nll"] == pytest.approx(nll[4], rel=1e-5)
    assert always["iterations"] == 2 * always["tokens"] and always["nll"] == pytest.approx(nll[2], rel=1e-5)
    # the criteria that read the distribution stop at 2 here, and their output is the check's logits
    for auto in (AutoDepth(min_loops=2, exit_criterion="confidence", exit_threshold=0.0),
                 AutoDepth(min_loops=2, exit_criterion="kl", exit_threshold=1e9)):
        r = forced_decode(eng, windows, auto)
        assert r["iterations"] == 2 * r["tokens"] and r["nll"] == pytest.approx(nll[2], rel=1e-5), auto
    assert nll[2] != pytest.approx(nll[4], rel=1e-3)  # the depths differ, so the comparison means something
