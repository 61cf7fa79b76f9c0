"""Property-based fuzzing of the HTTP API (hypothesis), in-process: malformed and extreme requests to
every endpoint never get a 5xx, every answer has the OpenAI shape (or is a well-formed completion or
stream), bodies with every field in range mostly reach the engine (counted), a lone surrogate in any
string field is a 400 naming that field, and afterwards the engine is healthy, idle, and a normal
request gets the right answer.

The examples are derandomized so `make test` is repeatable; MESH_FUZZ_EXAMPLES=5000 fuzzes longer
(with fresh random examples).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from server import Engine, EngineConfig
from server.api.app import create_app
from server_fixtures import reference_greedy

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="MESH_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_MODEL_LEN = 48

# ---- strategies ------------------------------------------------------------------------------
big_ints = st.one_of(st.integers(-5, 70), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 2.0, 2.0000001]))
# Lone surrogates: valid JSON ("\ud800"), invalid Unicode; hypothesis' st.text never makes them.
surrogates = st.tuples(st.text(max_size=6), st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=6)).map("".join)
texts = st.one_of(st.text(max_size=40), surrogates,
                  st.sampled_from(["", " ", "\x00", "\ud7ff", "\ud800", "🙂" * 10, "First Citizen:", "a" * 2000]))
scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.one_of(st.text(max_size=8), surrogates), inner, max_size=3)),
                           max_leaves=12)
token_lists = st.lists(st.one_of(st.integers(0, 300), big_ints), max_size=12)


def field(plausible):
    """Mostly values of the right type (edges included), sometimes any JSON value at all."""
    return st.one_of(plausible, plausible, json_values)


COMPLETION_FIELDS = {
    "model": field(st.sampled_from(["tiny", "gpt-4", "", "../../etc/passwd", "/tmp"])),
    "prompt": field(st.one_of(texts, st.lists(texts, max_size=3), token_lists, st.lists(token_lists, max_size=3))),
    "max_tokens": field(st.one_of(st.integers(-2, 60), big_ints)),
    "temperature": field(floats),
    "top_p": field(floats),
    "top_k": field(big_ints),
    "stop": field(st.one_of(texts, st.lists(texts, max_size=10))),
    "seed": field(big_ints),
    "n": field(st.integers(-1, 20)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                "continuous_usage_stats": st.booleans(), "x": scalars})),
    "logprobs": field(st.integers(-1, 7)),
    "echo": field(st.booleans()),
    "loops": field(st.one_of(st.integers(-1, 6), big_ints)),
    "ignore_eos": field(st.booleans()),
    "user": field(texts),
    "suffix": field(texts),
    "best_of": field(st.integers(-1, 3)),
    "logit_bias": field(st.dictionaries(texts, floats, max_size=2)),
    "presence_penalty": field(floats),
    "frequency_penalty": field(floats),
    "repetition_penalty": field(floats),
    "min_tokens": field(st.one_of(st.integers(-2, 60), big_ints)),
}
completion_bodies = st.fixed_dictionaries({}, optional={**COMPLETION_FIELDS, "unknown_field": json_values})
messages = st.lists(st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool", ""])),
                                           "content": field(st.one_of(texts, st.lists(st.fixed_dictionaries(
                                               {"type": st.just("text"), "text": texts}), max_size=2)))},
                                          optional={"name": texts}), max_size=4)
CHAT_FIELDS = {k: v for k, v in COMPLETION_FIELDS.items() if k not in ("prompt", "echo", "suffix", "best_of", "logprobs")}
chat_bodies = st.fixed_dictionaries({}, optional={**CHAT_FIELDS, "messages": field(messages), "logprobs": field(st.booleans()),
                                                  "top_logprobs": field(st.integers(-1, 7)),
                                                  "max_completion_tokens": field(st.integers(-2, 60)),
                                                  "tools": json_values, "unknown_field": json_values})
# In range on every field, so most reach the engine: odd texts, token ids, extreme seeds, every option.
ids = st.lists(st.integers(0, 299), min_size=1, max_size=10)
words = st.text(min_size=1, max_size=12)
valid_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(words, ids, st.lists(ids, min_size=1, max_size=3), st.lists(words, min_size=1, max_size=3))},
    optional={
        "model": st.just("tiny"), "max_tokens": st.integers(1, 30), "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(-1, 400),
        "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=8)),
        "seed": st.integers(-(2**63), 2**64 - 1), "n": st.integers(1, 4), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "logprobs": st.integers(0, 5),
        "echo": st.booleans(), "loops": st.integers(1, 4), "ignore_eos": st.booleans(),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0, 2, exclude_min=True), "min_tokens": st.integers(0, 1),
        "logit_bias": st.dictionaries(st.integers(0, 299).map(str), st.floats(-100, 100), max_size=3),
    }).map(lambda b: b if b.get("stream") else {k: v for k, v in b.items() if k != "stream_options"})  # it needs stream
raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"null", b"[]", b'{"prompt": NaN}', b"\xff\xfe",
                                                                b'{"prompt": "a", "prompt": [1]}', b'{"prompt": ' + b"[" * 5000]))


@pytest.fixture(scope="module")
def client(ckpt):
    engine = Engine(EngineConfig(model=ckpt, max_model_len=MAX_MODEL_LEN, max_batch_size=16, max_waiting=32))
    with TestClient(create_app(engine), raise_server_exceptions=False) as c:
        yield c


def check(r, stream: bool = False) -> None:
    """No 5xx; an error has the OpenAI shape; a success is a well-formed completion or stream."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
        return
    if stream:
        events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    elif r.headers["content-type"].startswith("application/json"):
        r.json()


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions_fields(client, body):
    # json.dumps writes NaN and Infinity, which Python's JSON parser (the server's) accepts
    r = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    check(r, stream=r.headers.get("content-type", "").startswith("text/event-stream"))


def test_fuzz_valid_ranges_reach_the_engine(client):
    """Bodies with every field in range: each answer is right for the body, and most (counted) are
    completions the engine ran, not 400s."""
    outcomes = Counter()

    @FUZZ
    @given(body=valid_bodies)
    def one(body):
        r = client.post("/v1/completions", json=body)
        outcomes[r.status_code] += 1
        p = body["prompt"]
        n_choices = (1 if isinstance(p, str) or isinstance(p[0], int) else len(p)) * body.get("n", 1)
        if r.status_code == 400:  # only for combinations the fields' own ranges cannot rule out
            assert r.json()["error"]["param"] in ("prompt", "max_tokens"), r.text
            return
        assert r.status_code == 200, r.text
        if body.get("stream"):
            check(r, stream=True)
            events = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
            finished = {c["index"] for e in events for c in e["choices"] if c["finish_reason"] in ("stop", "length")}
            assert finished == set(range(n_choices))
        else:
            choices = r.json()["choices"]
            assert [c["index"] for c in choices] == list(range(n_choices))
            assert all(c["finish_reason"] in ("stop", "length") for c in choices)
            assert (choices[0]["logprobs"] is not None) == ("logprobs" in body)
            assert r.json()["usage"]["completion_tokens"] <= n_choices * body.get("max_tokens", 16)

    one()
    total = sum(outcomes.values())
    assert outcomes[200] >= 0.8 * total, f"only {outcomes[200]} of {total} valid bodies reached the engine: {outcomes}"


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_fields(client, body):
    r = client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    check(r, stream=r.headers.get("content-type", "").startswith("text/event-stream"))


# Every string field of every endpoint, as (path, body with "\ud800" at that field, the field's param).
LONE = "ok\ud800"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SURROGATE_CASES = [
    *[("/v1/completions", {"prompt": "hi", "max_tokens": 2, **body}, param) for body, param in [
        ({"prompt": LONE}, "prompt"), ({"prompt": ["hi", LONE]}, "prompt[1]"), ({"model": LONE}, "model"),
        ({"stop": LONE}, "stop"), ({"stop": ["x", LONE]}, "stop[1]"), ({"user": LONE}, "user"),
        ({"suffix": LONE}, "suffix"), ({"logit_bias": {LONE: 1}}, "logit_bias")]],
    *[("/v1/chat/completions", {**CHAT, **body}, param) for body, param in [
        ({"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": LONE}]}]},
         "messages[1].content[0].text"),
        ({"model": LONE}, "model"), ({"stop": [LONE]}, "stop[0]"), ({"user": LONE}, "user"),
        ({"logit_bias": {LONE: 1}}, "logit_bias")]],
    ("/tokenize", {"prompt": LONE}, "prompt"), ("/tokenize", {"prompt": "hi", "model": LONE}, "model"),
    ("/v1/completions", {"prompt": "hi", LONE: 1}, "ok\\ud800"),  # a field name: echoed escaped, as text
    ("/detokenize", {"tokens": [1], "model": LONE}, "model"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_CASES, ids=[f"{p}-{q}" for p, _, q in SURROGATE_CASES])
def test_a_lone_surrogate_in_any_string_field_is_a_400_naming_it(client, path, body, param):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert ("Unicode" if param != "ok\\ud800" else "unknown field") in r.json()["error"]["message"], r.text


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]), content=raw_bodies,
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]))
def test_fuzz_raw_bodies(client, path, content, content_type):
    check(client.post(path, content=content, headers={"content-type": content_type} if content_type else {}))


@FUZZ
@given(path=st.sampled_from(["/tokenize", "/detokenize"]),
       body=st.fixed_dictionaries({}, optional={"model": field(texts), "prompt": field(texts), "tokens": field(token_lists),
                                                "add_special_tokens": field(st.booleans()), "x": json_values}))
def test_fuzz_tokenize_detokenize(client, path, body):
    check(client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.one_of(st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/completions", "/v1/models/tiny", "/v1/chat/completions"]),
                      st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"), max_size=30).map(lambda s: "/" + s.lstrip("/"))),
       request_id=st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b))
def test_fuzz_methods_paths_and_headers(client, method, path, request_id):
    check(client.request(method, path, headers={"X-Request-Id": request_id}))


def test_after_fuzzing_the_engine_is_healthy_idle_and_right(client):
    """Runs last in this module: the same engine has taken every fuzzed request above."""
    engine = client.app.state.engine
    assert client.get("/health").status_code == 200 and engine.alive
    metrics = client.get("/metrics").text
    for gauge in ("mesh_requests_running 0.0", "mesh_requests_waiting 0.0", "mesh_kv_cache_usage_ratio 0.0"):
        assert gauge in metrics.splitlines(), gauge
    assert 'status="5' not in metrics
    ids = engine.encode("First Citizen:")
    for loops in (1, 4):
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 16, "temperature": 0, "loops": loops,
                                                 "ignore_eos": True})
        assert r.status_code == 200, r.text
        ref, reliable = reference_greedy(engine.model, ids, loops, 16)
        assert reliable == 16
        assert r.json()["choices"][0]["text"] == engine.decode(ref)
