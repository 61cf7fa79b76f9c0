"""The HTTP API in-process (httpx ASGITransport, the app's own lifespan starting the engine thread):
OpenAI completions fields and response shape, SSE streaming, logprobs, echo, n, stop, seed, `loops`,
errors (400 with `param`, 404, 429 + Retry-After, 503), the operational endpoints, X-Request-Id,
Prometheus metrics, and the `openai` client as the README uses it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server import Engine, EngineConfig, SamplingParams
from server.api.app import create_app
from server_fixtures import build_checkpoint, reference_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

PROMPT = "First Citizen:"
NAME = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / NAME)


@pytest.fixture(scope="module")
def app(ckpt):
    engine = Engine(EngineConfig(model=ckpt, max_batch_size=8, max_waiting=64))
    app = create_app(engine, stop_engine_on_shutdown=False)  # one engine thread for the module
    yield app
    engine.stop()


def call(app, fn):
    """Runs `await fn(client)` against the app (lifespan entered) in a fresh event loop."""
    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await fn(client)
    return asyncio.run(go())


def post(app, body: dict, path: str = "/v1/completions", headers: dict | None = None) -> httpx.Response:
    # json.dumps escapes as ASCII, so a lone surrogate travels as the valid JSON "\\ud800"
    headers = {"content-type": "application/json", **(headers or {})}
    return call(app, lambda c: c.post(path, content=json.dumps(body), headers=headers))


def sse(text: str) -> list:
    """The JSON events of an SSE body; asserts the [DONE] terminator is last."""
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metrics(app) -> dict:
    text = call(app, lambda c: c.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_completion_shape_and_defaults(app, ckpt):
    engine = app.state.engine
    r = post(app, {"model": NAME, "prompt": PROMPT, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and isinstance(body["created"], int)
    assert body["model"] == NAME and body["loops"] == engine.model.config.default_loops == 2
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    n_prompt = len(engine.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16, "total_tokens": n_prompt + 16,
                             "loop_steps": 16 * 2}  # max_tokens 16; each token ran 2 core iterations
    assert len(r.headers["x-request-id"]) == 32


@pytest.mark.parametrize("loops", [1, 4])
def test_greedy_is_identical_streaming_and_not_and_matches_generate(app, loops):
    engine = app.state.engine
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "loops": loops, "ignore_eos": True}
    plain = post(app, body).json()
    chunks = sse(post(app, {**body, "stream": True}).text)
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == plain["choices"][0]["text"]
    ref, reliable = reference_greedy(engine.model, engine.encode(PROMPT), loops, 20)
    assert reliable == 20, "the random test model has a near-tie: pick another prompt"
    assert plain["choices"][0]["text"] == engine.decode(ref) and plain["loops"] == loops


def test_loops_changes_the_text_and_is_validated(app):
    texts = {}
    for k in (1, 2, 3, 4):
        body = post(app, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "loops": k}).json()
        assert body["loops"] == k
        texts[k] = body["choices"][0]["text"]
    assert len(set(texts.values())) == 4
    for bad in (0, 5, "2", True, 1.5):
        r = post(app, {"prompt": PROMPT, "loops": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "loops", bad


def test_prompt_forms_and_usage(app):
    engine = app.state.engine
    ids = engine.encode(PROMPT)
    other = engine.encode("All: Speak")
    base = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    one = post(app, {**base, "prompt": PROMPT}).json()
    for prompt, n_choices, n_prompt in [
        (ids, 1, len(ids)),
        ([PROMPT, "All: Speak"], 2, len(ids) + len(other)),
        ([ids, other], 2, len(ids) + len(other)),
    ]:
        body = post(app, {**base, "prompt": prompt}).json()
        assert [c["index"] for c in body["choices"]] == list(range(n_choices))
        assert body["choices"][0]["text"] == one["choices"][0]["text"], "token ids and text give the same completion"
        assert body["usage"]["prompt_tokens"] == n_prompt and body["usage"]["completion_tokens"] == 5 * n_choices


def test_n_and_seed(app):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3, "ignore_eos": True}
    a, b = post(app, body).json(), post(app, body).json()
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c["text"] for c in b["choices"]], "same seed, same texts"
    assert a["usage"]["prompt_tokens"] == len(app.state.engine.encode(PROMPT)), "the prompt is counted once"
    c = post(app, {**body, "seed": 12}).json()
    assert [x["text"] for x in c["choices"]] != texts
    two = post(app, {"prompt": [PROMPT, "All"], "n": 2, "max_tokens": 4, "temperature": 0}).json()
    assert [x["index"] for x in two["choices"]] == [0, 1, 2, 3]  # prompt-major: prompt p, choice i -> p * n + i
    assert two["choices"][0]["text"] == two["choices"][1]["text"] != two["choices"][2]["text"]


def test_top_k_and_top_p_narrow_sampling(app):
    base = {"prompt": PROMPT, "max_tokens": 10, "ignore_eos": True}
    greedy = post(app, {**base, "temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):  # one token left: sampling at temperature 1 is greedy
        for seed in (1, 2):
            assert post(app, {**base, "temperature": 1.0, "seed": seed, **extra}).json()["choices"][0]["text"] == greedy
    wide = {post(app, {**base, "temperature": 1.0, "seed": s}).json()["choices"][0]["text"] for s in (1, 2)}
    assert greedy not in wide and len(wide) == 2, "without the filters the draws differ"


def test_streaming_format(app):
    body = {"prompt": [PROMPT, "All"], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    r = post(app, {**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4 * 6
    assert all(c["usage"] is None for c in chunks)
    assert {c["id"] for c in events} == {last["id"]} and all(c["object"] == "text_completion" and c["loops"] == 2 for c in events)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1, 2, 3]
    for i in range(4):  # a choice's finish_reason comes on its last chunk
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[-1]["finish_reason"] == "length" and all(m["finish_reason"] is None for m in mine[:-1])
    plain = post(app, {k: v for k, v in body.items() if k != "stream"}).json()
    for i in range(4):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) == plain["choices"][i]["text"]
    assert all("usage" not in c for c in sse(post(app, body).text)), "no usage unless include_usage"


@torch.inference_mode()
def model_logprobs(engine, ids: list[int], loops: int) -> torch.Tensor:
    """The model's own log-softmax over the whole sequence, row i predicting token i + 1."""
    return engine.model(torch.tensor([ids]), loops=loops).logits[0].float().log_softmax(-1)


def top_texts(engine, row: torch.Tensor, k: int) -> dict:
    """OpenAI's top_logprobs entry: the k likeliest tokens by their text (the likelier of two same texts)."""
    top = {}
    values, ids = row.topk(k)
    for t, v in zip(ids.tolist(), values.tolist()):
        top.setdefault(engine.decode([t]), v)
    return top


def test_logprobs_and_text_offset_are_the_models(app):
    """token_logprobs and top_logprobs against the model's own log-softmax at the request's depth, and
    text_offset against the decoded text, streamed or not, with and without echo."""
    engine = app.state.engine
    ids = engine.encode(PROMPT)
    ref, reliable = reference_greedy(engine.model, ids, 3, 5)
    assert reliable == 5, "the random test model has a near-tie: pick another prompt"
    lp_all = model_logprobs(engine, ids + ref, 3)
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": True, "loops": 3}
    choice = post(app, body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == engine.decode(ref)
    assert lp["tokens"] == [engine.decode([t]) for t in ref]
    for i, tok in enumerate(ref):
        row = lp_all[len(ids) + i - 1]
        assert lp["token_logprobs"][i] == pytest.approx(float(row[tok]), abs=1e-4)
        assert lp["top_logprobs"][i] == pytest.approx(top_texts(engine, row, 2), abs=1e-4)
        assert lp["text_offset"][i] == len(engine.decode(ref[:i]))
    zero = post(app, {**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert [list(t) for t in zero["top_logprobs"]] == [[t] for t in lp["tokens"]], "logprobs=0: only the sampled token"
    # echo: the prompt first, in the text and the logprobs; its first token has none
    echo = post(app, {**body, "echo": True}).json()["choices"][0]
    assert echo["text"] == PROMPT + choice["text"]
    elp = echo["logprobs"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        assert elp["token_logprobs"][j] == pytest.approx(float(lp_all[j - 1, ids[j]]), abs=1e-4)
    assert elp["text_offset"] == [len(engine.decode(ids[:j])) for j in range(len(ids))] + [len(PROMPT) + o for o in lp["text_offset"]]
    # streamed: the chunks' entries add up to the same
    chunks = sse(post(app, {**body, "stream": True}).text)
    streamed = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks), []) for k in ("tokens", "token_logprobs", "text_offset")}
    assert streamed == {k: lp[k] for k in streamed}
    echo_chunks = sse(post(app, {**body, "stream": True, "echo": True}).text)
    assert echo_chunks[0]["choices"][0]["text"] == PROMPT


def test_sampling_fields_change_the_output(app):
    """logit_bias, the penalties and min_tokens reach the engine's sampler: each changes greedy text the
    way it should."""
    engine = app.state.engine
    base = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = post(app, base).json()["choices"][0]["text"]
    forced = engine.encode(" Speak")[-1]
    biased = post(app, {**base, "logit_bias": {str(forced): 100}}).json()["choices"][0]["text"]
    assert biased == engine.decode([forced] * 12)
    ids = engine.encode(PROMPT)
    ref, _ = reference_greedy(engine.model, ids, 2, 24)
    assert len(set(ref)) < len(ref), "the random model repeats itself greedily (what the penalties act on)"
    for field in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        value = 1.8 if field == "repetition_penalty" else 2.0
        text = post(app, {**base, "max_tokens": 24, field: value}).json()["choices"][0]["text"]
        assert text != engine.decode(ref), field
    eos = engine.eos_token_id
    early = post(app, {**base, "ignore_eos": False, "logit_bias": {str(eos): 100}, "max_tokens": 8}).json()
    assert early["usage"]["completion_tokens"] == 1 and early["choices"][0]["finish_reason"] == "stop"
    held = post(app, {**base, "ignore_eos": False, "logit_bias": {str(eos): 100}, "max_tokens": 8, "min_tokens": 5}).json()
    assert held["usage"]["completion_tokens"] >= 5
    assert plain != biased


def test_stop_strings(app):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "loops": 1, "ignore_eos": True}
    text = post(app, body).json()["choices"][0]["text"]
    stop = text[4:7]
    assert text.find(stop) == 4
    for value in (stop, ["zzzz", stop]):
        out = post(app, {**body, "stop": value}).json()
        assert out["choices"][0]["text"] == text[:4] and out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] < 24
        streamed = sse(post(app, {**body, "stop": value, "stream": True}).text)
        assert "".join(c["choices"][0]["text"] for c in streamed) == text[:4]
        assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


BAD = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"seed": "1"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"echo": 1}, "echo"),
    ({"foo": 1}, "foo"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 17}, "min_tokens"),  # more than max_tokens (16)
    ({"min_tokens": -1}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "stream_options.continuous_usage_stats"),
    ({"tools": []}, "tools"),
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ({"stop": ["\ud800"]}, "stop[0]"),
    ({"user": "\udc00"}, "user"),
    ({"model": "\ud800"}, "model"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt[0]"),  # not a list of strings at [0] (the first union member that fits)
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": "Speak " * 300}, "prompt"),  # longer than max_model_len (256)
    ({"max_tokens": 255}, "max_tokens"),  # prompt (3 tokens) + max_tokens > max_model_len (256)
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p + "-" + json.dumps(f)[:30] for f, p in BAD])
def test_invalid_fields_are_400_naming_the_field(app, fields, param):
    r = post(app, {"prompt": PROMPT, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unparseable_bodies_and_missing_prompt_are_400(app):
    for content in (b"{not json", b"[1, 2]", b"{}"):
        r = call(app, lambda c: c.post("/v1/completions", content=content, headers={"content-type": "application/json"}))
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, content
    assert r.json()["error"]["param"] == "prompt"


def test_what_clients_send_is_accepted(app):
    """The fields OpenAI and vLLM clients send at their usual values, and no-op values of refused ones."""
    body = {"prompt": PROMPT, "max_tokens": 2, "suffix": None, "best_of": 1, "logit_bias": {}, "presence_penalty": 0,
            "frequency_penalty": 0.0, "repetition_penalty": 1, "min_tokens": 0, "user": "someone", "top_k": -1,
            "ignore_eos": False}
    assert post(app, body).json()["usage"]["completion_tokens"] <= 2
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert sse(post(app, streamed).text)[-1]["usage"]["prompt_tokens"] == len(app.state.engine.encode(PROMPT))


def test_continuous_usage_stats_put_usage_in_every_chunk(app):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    chunks = sse(post(app, body).text)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and all(c["usage"]["prompt_tokens"] > 0 for c in chunks)
    assert chunks[-1]["choices"], "no separate usage chunk without include_usage"


def test_lone_surrogates_are_400_on_tokenize_too(app):
    r = post(app, {"prompt": "x\ud800"}, "/tokenize")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "Unicode" in r.json()["error"]["message"]


def test_unknown_model_is_404(app):
    r = post(app, {"model": "gpt-4", "prompt": PROMPT})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "model_not_found"
    assert call(app, lambda c: c.get("/v1/models/gpt-4")).status_code == 404
    assert post(app, {"model": "gpt-4", "prompt": "x"}, "/tokenize").status_code == 404
    assert call(app, lambda c: c.get("/no/such/route")).json()["error"]["type"] == "not_found_error"


def test_models_health_tokenize_detokenize(app):
    engine = app.state.engine
    models = call(app, lambda c: c.get("/v1/models")).json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == NAME and card["object"] == "model"
    assert (card["max_model_len"], card["max_loops"], card["default_loops"]) == (256, 4, 2)
    assert card["layout"] == "1+1R2+1" and card["scheme"] == "mesh"
    assert call(app, lambda c: c.get(f"/v1/models/{NAME}")).json()["id"] == NAME
    assert call(app, lambda c: c.get("/health")).status_code == 200
    tok = post(app, {"prompt": PROMPT}, "/tokenize").json()
    assert tok == {"tokens": engine.encode(PROMPT), "count": len(engine.encode(PROMPT)), "max_model_len": 256}
    assert post(app, {"tokens": tok["tokens"]}, "/detokenize").json() == {"prompt": PROMPT}
    bad = post(app, {"tokens": [engine.vocab_size]}, "/detokenize")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert post(app, {"tokens": [1, "a"]}, "/detokenize").json()["error"]["param"] == "tokens[1]"


def test_request_id_is_echoed(app):
    r = post(app, {"prompt": PROMPT, "max_tokens": 1}, headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert post(app, {"prompt": 5}, headers={"X-Request-Id": "trace-43"}).headers["x-request-id"] == "trace-43"
    assert call(app, lambda c: c.get("/health", headers={"X-Request-Id": "h1"})).headers["x-request-id"] == "h1"
    replaced = post(app, {"prompt": PROMPT, "max_tokens": 1}, headers={"X-Request-Id": "has space"}).headers["x-request-id"]
    assert replaced != "has space" and len(replaced) == 32


def test_metrics(app):
    engine = app.state.engine
    before = metrics(app)
    ok = ("mesh_requests_total", (("finish_reason", "length"), ("status", "200")))
    bad = ("mesh_requests_total", (("finish_reason", ""), ("status", "400")))
    gen3 = ("mesh_generation_tokens_total", (("loops", "3"),))
    r = post(app, {"prompt": PROMPT, "max_tokens": 7, "loops": 3, "ignore_eos": True, "stream": True})
    assert r.status_code == 200
    post(app, {"prompt": PROMPT, "max_tokens": 7, "loops": 3, "ignore_eos": True})
    post(app, {"prompt": PROMPT, "loops": 9})
    after = metrics(app)
    assert after[ok] - before.get(ok, 0) == 2 and after[bad] - before.get(bad, 0) == 1
    assert after[gen3] - before.get(gen3, 0) == 14
    n_prompt = len(engine.encode(PROMPT))
    assert after[("mesh_prompt_tokens_total", ())] - before[("mesh_prompt_tokens_total", ())] == 2 * n_prompt
    for name in ("mesh_time_to_first_token_seconds", "mesh_e2e_request_latency_seconds", "mesh_request_queue_time_seconds"):
        assert after[(name + "_count", ())] - before[(name + "_count", ())] == 2, name
    assert after[("mesh_inter_token_latency_seconds_count", ())] - before[("mesh_inter_token_latency_seconds_count", ())] == 12
    assert after[("mesh_request_loops_bucket", (("le", "3.0"),))] - before[("mesh_request_loops_bucket", (("le", "3.0"),))] == 2
    assert after[("mesh_request_loops_bucket", (("le", "2.0"),))] == before[("mesh_request_loops_bucket", (("le", "2.0"),))]
    assert after[("mesh_requests_running", ())] == 0 and after[("mesh_requests_waiting", ())] == 0
    assert after[("mesh_kv_cache_usage_ratio", ())] == 0 and after[("mesh_max_waiting", ())] == 64
    (info,) = [dict(k[1]) for k in after if k[0] == "mesh_model_info"]
    assert (info["layout"], info["scheme"], info["max_loops"], info["name"]) == ("1+1R2+1", "mesh", "4", NAME)


def test_queue_full_is_429_with_retry_after_and_dead_engine_is_503(ckpt):
    engine = Engine(EngineConfig(model=ckpt, max_waiting=2))  # its thread never starts: nothing leaves the queue
    app = create_app(engine)
    transport = httpx.ASGITransport(app=app)

    async def go():  # no lifespan: the engine stays stopped
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            assert (await c.get("/health")).status_code == 503
            engine.add_request([engine.encode(PROMPT)] * 2, SamplingParams(max_tokens=4))
            r = await c.post("/v1/completions", json={"prompt": PROMPT})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
            r = await c.post("/v1/completions", json={"prompt": PROMPT, "n": 3})  # can never fit: not a 429
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
            text = (await c.get("/metrics")).text
            assert 'mesh_requests_total{finish_reason="",status="429"} 1.0' in text
            assert "mesh_requests_waiting 2.0" in text and "mesh_max_waiting 2.0" in text

    asyncio.run(go())


def test_a_failing_request_is_500_and_its_neighbours_succeed(ckpt):
    """A request whose logits turn NaN (a poisoned token embedding) gets a 500-class error, or an error
    event in a stream; requests running beside it are unaffected."""
    engine = Engine(EngineConfig(model=ckpt))
    poison = engine.vocab_size - 1
    with torch.no_grad():
        engine.model.embed_in.weight[poison] = float("nan")
    app = create_app(engine, stop_engine_on_shutdown=False)
    ids = engine.encode(PROMPT)
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def go(c):
        return await asyncio.gather(
            c.post("/v1/completions", json={**body, "prompt": ids + [poison]}),
            c.post("/v1/completions", json={**body, "prompt": ids + [poison], "stream": True}),
            c.post("/v1/completions", json=body),
        )

    bad, bad_stream, ok = call(app, go)
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "internal_error"
    events = bad_stream.text.split("\n\n")
    assert json.loads(events[0][len("data: "):])["error"]["type"] == "internal_error" and events[1] == "data: [DONE]"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
    text = call(app, lambda c: c.get("/metrics")).text
    assert 'mesh_requests_total{finish_reason="",status="500"} 2.0' in text
    assert call(app, lambda c: c.get("/health")).status_code == 200, "the engine keeps serving"
    engine.stop()


def test_openai_client(app):
    """The README's client example, through the app in-process."""
    async def go(_):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
        res = await client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"loops": 3})
        stream = await client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"loops": 3})
        streamed = "".join([chunk.choices[0].text async for chunk in stream])
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model=NAME, prompt=PROMPT, extra_body={"loops": 9})
        await http.aclose()
        return res, streamed, e.value

    res, streamed, err = call(app, go)
    direct = post(app, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "loops": 3}).json()
    assert res.choices[0].text == streamed == direct["choices"][0]["text"]
    assert res.model_extra["loops"] == 3 and res.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert err.status_code == 400 and err.body["param"] == "loops"
