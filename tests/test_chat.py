"""POST /v1/chat/completions in-process: the prompt from the tokenizer's chat_template (or the plain
template of a base model), the chat.completion and chat.completion.chunk shapes, stream_options,
n / seed / stop / max_completion_tokens / logprobs / loops, refused fields naming themselves, metrics
counted like completions, and the official `openai` client, streamed and not.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from server import Engine, EngineConfig
from server.api.app import create_app
from server.api.serving import PLAIN_CHAT_TEMPLATE
from server.engine.sampler import MAX_LOGPROBS
from server_fixtures import build_checkpoint, reference_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

NAME = "tiny"
MESSAGES = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A citizen."}, {"role": "user", "content": "Speak!"}]
TEMPLATE = ("{% if messages[-1].role == 'assistant' %}{{ raise_exception('the last message must not be the assistant') }}"
            "{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_app(path, **kw):
    engine = Engine(EngineConfig(model=path, max_batch_size=8, max_waiting=64))
    return create_app(engine, stop_engine_on_shutdown=False, **kw), engine


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, engine = make_app(build_checkpoint(tmp_path_factory.mktemp("ckpt") / NAME))
    yield app
    engine.stop()


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A checkpoint whose tokenizer carries its own chat_template."""
    path = build_checkpoint(tmp_path_factory.mktemp("ckpt") / NAME)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(path))
    app, engine = make_app(path)
    yield app
    engine.stop()


def call(app, fn):
    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await fn(client)
    return asyncio.run(go())


def post(app, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return call(app, lambda c: c.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


def sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_plain_template_for_a_base_model(app):
    """No chat_template: the documented plain template; the reply is the completion of that prompt."""
    engine = app.state.engine
    assert engine.tokenizer.chat_template is None
    prompt = "Speak plainly.\nUser: Who are you?\nAssistant: A citizen.\nUser: Speak!\nAssistant:"
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = post(app, body)
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion" and chat["model"] == NAME
    (choice,) = chat["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"} and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    ids = engine.encode(prompt)
    ref, reliable = reference_greedy(engine.model, ids, 2, 10)
    assert reliable == 10, "the random test model has a near-tie: change the messages"
    assert choice["message"]["content"] == engine.decode(ref)
    assert chat["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10,
                             "loop_steps": 10 * 2}
    assert engine.tokenizer.apply_chat_template(MESSAGES, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True) == prompt


def test_the_models_chat_template_is_used(templated):
    engine = templated.state.engine
    prompt = "<|system|>Speak plainly.\n<|user|>Who are you?\n<|assistant|>A citizen.\n<|user|>Speak!\n<|assistant|>"
    chat = post(templated, {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "loops": 3}).json()
    completion = post(templated, {"prompt": engine.encode(prompt, add_special_tokens=False), "max_tokens": 8,
                                  "temperature": 0, "ignore_eos": True, "loops": 3}, "/v1/completions").json()
    assert chat["usage"]["prompt_tokens"] == len(engine.encode(prompt, add_special_tokens=False))
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"] and chat["loops"] == 3
    refused = post(templated, {"messages": MESSAGES[:3], "max_tokens": 2})  # the template's own raise_exception
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
    assert "must not be the assistant" in refused.json()["error"]["message"]


def test_streaming_matches_and_has_the_chunk_shape(app):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2}
    plain = post(app, body).json()
    events = sse(post(app, {**body, "stream": True, "stream_options": {"include_usage": True}}).text)
    *chunks, last = events
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    assert last["choices"] == [] and last["usage"] == plain["usage"] and all(c["usage"] is None for c in chunks)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}, "the role comes first"
        assert "".join(m["delta"].get("content", "") for m in mine) == plain["choices"][i]["message"]["content"]
        assert mine[-1]["finish_reason"] == "length" and all(m["finish_reason"] is None for m in mine[:-1])
    continuous = sse(post(app, {**body, "n": 1, "stream": True, "stream_options": {"continuous_usage_stats": True}}).text)
    counts = [e["usage"]["completion_tokens"] for e in continuous]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 6


def test_sampling_fields(app):
    base = {"messages": MESSAGES, "temperature": 1.0, "seed": 5, "n": 3, "max_completion_tokens": 8, "ignore_eos": True}
    a, b = post(app, base).json(), post(app, base).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]] and len(set(texts)) == 3
    assert a["usage"]["completion_tokens"] == 24, "max_completion_tokens is max_tokens"
    greedy = post(app, {"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "ignore_eos": True}).json()
    text = greedy["choices"][0]["message"]["content"]
    stopped = post(app, {"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": text[3:6]}).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(text[3:6])]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    deeper = post(app, {"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "loops": 4}).json()
    assert deeper["loops"] == 4 and deeper["choices"][0]["message"]["content"] != text


@torch.inference_mode()
def test_logprobs_are_the_models(app):
    engine = app.state.engine
    prompt = engine.encode(engine.tokenizer.apply_chat_template(MESSAGES, chat_template=PLAIN_CHAT_TEMPLATE,
                                                                tokenize=False, add_generation_prompt=True))
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    content = post(app, body).json()["choices"][0]["logprobs"]["content"]
    ref, _ = reference_greedy(engine.model, prompt, 2, 4)
    lp = engine.model(torch.tensor([prompt + ref]), loops=2).logits[0].float().log_softmax(-1)
    assert [e["token"] for e in content] == [engine.decode([t]) for t in ref]
    for i, (entry, tok) in enumerate(zip(content, ref)):
        row = lp[len(prompt) + i - 1]
        assert entry["logprob"] == pytest.approx(float(row[tok]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        values, ids = row.topk(3)
        assert [e["token"] for e in entry["top_logprobs"]] == [engine.decode([t]) for t in ids.tolist()]
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
    streamed = sse(post(app, {**body, "stream": True}).text)
    assert sum((c["choices"][0]["logprobs"]["content"] for c in streamed if c["choices"][0]["logprobs"]), []) == content


@pytest.mark.parametrize("fields,param,needle", [
    ({"tools": [{"type": "function"}]}, "tools", "no tool calling"),
    ({"response_format": {"type": "json_object"}}, "response_format", "structured output"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "system"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "unknown field"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content[0].image_url", "unknown field"),
    ({"messages": []}, "messages", ""),
    ({"top_logprobs": MAX_LOGPROBS + 1, "logprobs": True}, "top_logprobs", str(MAX_LOGPROBS)),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagree"),
    ({"logprobs": 1}, "logprobs", ""),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"echo": True}, "echo", "unknown field"),
    ({"loops": 9}, "loops", ""),
])
def test_refused_fields_name_themselves(app, fields, param, needle):
    r = post(app, {"messages": MESSAGES, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error", err


def test_metrics_count_chat_like_completions(app):
    def requests_ok() -> float:
        text = call(app, lambda c: c.get("/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "mesh_requests_total" and s.labels == {"status": "200", "finish_reason": "length"})

    before = requests_ok()
    post(app, {"messages": MESSAGES, "max_tokens": 2, "ignore_eos": True})
    post(app, {"messages": MESSAGES, "max_tokens": 2, "ignore_eos": True, "stream": True})
    post(app, {"prompt": "x", "max_tokens": 2, "ignore_eos": True}, "/v1/completions")
    assert requests_ok() - before == 3


def test_openai_client(app):
    async def go(_):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
        kw = dict(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"loops": 3, "ignore_eos": True})
        res = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
        await http.aclose()
        return res, "".join(parts), usage, e.value

    res, streamed, usage, err = call(app, go)
    assert res.choices[0].message.content == streamed and res.choices[0].message.role == "assistant"
    assert res.model_extra["loops"] == 3 and usage.completion_tokens == res.usage.completion_tokens == 8
    assert err.status_code == 400 and err.body["param"] == "tools"
