"""Authentication and request limits: Bearer API keys (constant-time, default deny, /health open, /metrics
open or not), keys from flags / a file / MESH_API_KEY and never in logs (a real server subprocess), the
request-body limit (413, Content-Length or chunked), stop-string length, and request `model` fields
that are never paths.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from server import __main__ as cli
from server.api import security
from server.api.app import create_app
from server_fixtures import build_checkpoint

KEYS = ["key-one-0123456789", "key-two-abcdefghij"]
BODY = {"prompt": "First Citizen:", "max_tokens": 3, "temperature": 0}


def client_for(engine, **kw) -> TestClient:
    return TestClient(create_app(engine, stop_engine_on_shutdown=False, **kw), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def keyed(engine):
    with client_for(engine, api_keys=KEYS, max_request_bytes=4096) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.json() == {"error": {"message": "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
    for key in KEYS:
        assert key not in r.text


API = [("POST", "/v1/completions", BODY), ("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None),
       ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [5]}), ("GET", "/no/such/path", None),
       ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]


@pytest.mark.parametrize("method,path,body", API, ids=[p for _, p, _ in API])
def test_every_api_path_needs_a_valid_bearer_key(keyed, method, path, body):
    call = lambda headers: keyed.request(method, path, json=body, headers=headers)  # noqa: E731
    for headers in ({}, bearer("wrong-key-000"), bearer(KEYS[0][:-1]), bearer(KEYS[0] + "x"), bearer(""),
                    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]},
                    {"Authorization": f"Bearer {KEYS[0]} {KEYS[1]}"}, {"X-Api-Key": KEYS[0]}):
        assert_401(call(headers))
    for key in KEYS:  # either key; the scheme is case-insensitive
        for headers in (bearer(key), {"Authorization": f"bearer  {key}"}):
            r = call(headers)
            assert r.status_code == (404 if path == "/no/such/path" else 200), (headers, r.text)


def test_health_docs_metrics_and_the_playground_stay_open(keyed, engine):
    assert keyed.get("/health").json() == {"status": "ok"}
    page = keyed.get("/")  # the playground loads without a key; its API calls send the one typed in
    assert page.status_code == 200 and 'id="api-key"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert keyed.get("/static/app.js").status_code == 200 and keyed.get("/static/style.css").status_code == 200
    assert keyed.get("/static/nope.js").status_code == 404
    with client_for(engine, api_keys=KEYS, ui=False) as no_ui:
        assert_401(no_ui.get("/")), "--no-ui: no open playground path left"
        assert no_ui.get("/docs").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200 and keyed.get("/docs").status_code == 200
    r = keyed.get("/metrics")
    assert r.status_code == 200 and "mesh_requests_running" in r.text
    with client_for(engine, api_keys=KEYS, metrics_require_key=True) as strict:
        assert_401(strict.get("/metrics"))
        assert strict.get("/metrics", headers=bearer(KEYS[1])).status_code == 200
        assert strict.get("/health").status_code == 200


def test_rejections_are_counted_and_streams_work_with_a_key(keyed):
    def rejected() -> float:
        for line in keyed.get("/metrics").text.splitlines():
            if line.startswith('mesh_requests_total{finish_reason="",status="401"}'):
                return float(line.split()[-1])
        return 0.0

    before = rejected()
    assert_401(keyed.post("/v1/completions", json=BODY))
    assert rejected() == before + 1
    r = keyed.post("/v1/completions", json={**BODY, "stream": True}, headers=bearer(KEYS[0]))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_keys_are_compared_in_constant_time_against_every_key(keyed, monkeypatch):
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert keyed.get("/v1/models", headers=bearer(KEYS[0])).status_code == 200
    assert [b for _, b in calls] == [k.encode() for k in KEYS], "no early exit on the first match"
    calls.clear()
    assert keyed.get("/v1/models", headers=bearer("guess")).status_code == 401
    assert len(calls) == len(KEYS)


def test_openai_client_with_and_without_the_key(keyed):
    def client(key):
        return openai.OpenAI(base_url=str(keyed.base_url) + "/v1", api_key=key, http_client=keyed, max_retries=0)

    res = client(KEYS[1]).completions.create(model="tiny", prompt="First Citizen:", max_tokens=3, extra_body={"loops": 2})
    assert res.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError) as e:
        client("sk-wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


# ---- limits ----------------------------------------------------------------------------------
def test_request_body_limit(keyed):
    auth = bearer(KEYS[0])
    big = json.dumps({**BODY, "prompt": "a" * 5000}).encode()
    r = keyed.post("/v1/completions", content=big, headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large" and "4096 bytes" in r.json()["error"]["message"]

    r = keyed.post("/v1/completions", content=b"{}", headers={**auth, "content-type": "application/json", "content-length": "x"})
    assert r.status_code == 400
    # the key is checked before the body is read: a large unauthenticated body is a 401, not a 413
    assert_401(keyed.post("/v1/completions", content=big, headers={"content-type": "application/json"}))


def test_chunked_uploads_are_counted_as_they_arrive(serve, ckpt):
    """A real server and a real chunked upload (no Content-Length): over the limit is a 413, under it
    the request runs (the body is padded with JSON whitespace to near the limit)."""
    server = serve(["--model", str(ckpt), "--max-request-bytes", "4096"])

    def chunks(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    small = (json.dumps(BODY) + " " * 3500).encode()
    big = json.dumps({**BODY, "prompt": "a" * 5000}).encode()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        ok = c.post("/v1/completions", content=chunks(small), headers={"content-type": "application/json"})
        assert ok.request.headers["transfer-encoding"] == "chunked" and "content-length" not in ok.request.headers
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3, ok.text
        r = c.post("/v1/completions", content=chunks(big), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.post("/v1/completions", json=BODY).status_code == 200, "the server goes on serving"


def test_stop_strings_are_bounded(keyed):  # their number: test_server_api.py's BAD table
    auth = bearer(KEYS[0])
    r = keyed.post("/v1/completions", json={**BODY, "stop": "x" * 257}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "256" in r.json()["error"]["message"]
    assert keyed.post("/v1/completions", json={**BODY, "stop": "x" * 256}, headers=auth).status_code == 200


def test_the_model_field_is_a_name_never_a_path(keyed, engine, ckpt, tmp_path):
    other = build_checkpoint(tmp_path / "other", layout="1+1R2+1", seed=1)
    for name in (str(other), str(ckpt), "../tiny", str(tmp_path)):
        r = keyed.post("/v1/completions", json={**BODY, "model": name}, headers=bearer(KEYS[0]))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", name
    assert engine.model_path == ckpt


# ---- the CLI ---------------------------------------------------------------------------------
def test_keys_from_flags_file_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("MESH_API_KEY", "env-key")
    assert cli.api_keys(cli.parse_args([])) == ["env-key"]
    assert cli.api_keys(cli.parse_args(["--api-key", "a-key", "--api-key", "b-key"])) == ["a-key", "b-key"], "flags win"
    assert cli.api_keys(cli.parse_args(["--api-key-file", str(f)])) == ["env-key", "file-key-1", "file-key-2"]
    monkeypatch.setenv("MESH_API_KEY_FILE", str(f))
    monkeypatch.delenv("MESH_API_KEY")
    assert cli.api_keys(cli.parse_args([])) == ["file-key-1", "file-key-2"]
    assert "env-key" not in cli.build_parser().format_help()
    monkeypatch.setenv("MESH_METRICS_REQUIRE_KEY", "1")
    assert cli.parse_args([]).metrics_require_key


@pytest.mark.parametrize("argv,content,needle", [
    (["--api-key-file", "{dir}/missing"], None, "cannot be read"),
    (["--api-key-file", "{dir}/keys"], "# only a comment\n", "holds no key"),
    (["--api-key-file", "{dir}/keys"], "good-key\nbad key with spaces\n", "line 2"),
    (["--api-key", "has space"], None, "printable ASCII"),
])
def test_bad_keys_give_a_one_line_error_without_the_key(tmp_path, capsys, monkeypatch, argv, content, needle):
    monkeypatch.delenv("MESH_API_KEY", raising=False)
    if content is not None:
        (tmp_path / "keys").write_text(content)
    # checked before the model loads: the missing model directory is never reached
    assert cli.main([a.replace("{dir}", str(tmp_path)) for a in argv] + ["--model", "/no/such/dir"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("python -m server: error: --api-key") and needle in err, err
    assert "bad key" not in err and "has space" not in err


def test_bad_limits_are_usage_errors(capsys):
    for argv in (["--request-timeout", "-1"], ["--max-request-bytes", "0"], ["--shutdown-grace", "-5"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2 and argv[0] in capsys.readouterr().err.splitlines()[-1]


def test_real_server_with_keys_never_logs_them(serve, ckpt, tmp_path):
    (tmp_path / "keys").write_text("file-key-777777\n")
    server = serve(["--model", str(ckpt), "--api-key-file", str(tmp_path / "keys"), "--log-level", "debug"],
                   env={"MESH_API_KEY": "env-key-555555"})
    guess = "sk-guessed-key-999"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.post("/v1/completions", json=BODY).status_code == 401
        assert c.post("/v1/completions", json=BODY, headers=bearer(guess)).status_code == 401
        for key in ("env-key-555555", "file-key-777777"):
            assert c.post("/v1/completions", json=BODY, headers=bearer(key)).status_code == 200
            assert c.post("/v1/completions", json={**BODY, "stream": True}, headers=bearer(key)).status_code == 200
        assert c.post("/tokenize", json={"prompt": "x"}, headers=bearer(guess)).status_code == 401
    assert server.terminate() == 0
    log = server.log()
    assert "API keys: 2 configured" in log and "POST /v1/completions" in log  # it did log the requests
    for secret in ("env-key-555555", "file-key-777777", guess):
        assert secret not in log


FAULTY = """
import sys
import server.api.serving as serving
real = serving.chat_prompt
def chat_prompt(tokenizer, messages):  # a fault no request validation could catch
    if messages[0].text() == "boom":
        raise RuntimeError("injected fault")
    return real(tokenizer, messages)
serving.chat_prompt = chat_prompt
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_is_a_clean_500_and_the_connection_stays_usable(serve, ckpt):
    """Starlette's own 500 re-raises, and uvicorn then drops the kept-alive connection; ours answers
    in the OpenAI shape and the client's next request on the same connection works."""
    import http.client

    server = serve(["--model", str(ckpt)], code=FAULTY)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

    def chat(content: str):
        body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), r.getheader("connection")

    status, body, connection = chat("boom")
    sock = conn.sock
    assert status == 500 and body == {"error": {"message": "internal server error", "type": "internal_error",
                                                "param": None, "code": None}}
    assert connection != "close" and sock is not None
    status, body, _ = chat("hello")
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert conn.sock is sock, "the same connection served the next request"
    conn.close()
    metrics = server.metrics()
    assert metrics[("mesh_requests_total", (("finish_reason", ""), ("status", "500")))] == 1
    log = server.log()
    assert "injected fault" in log and "Exception in ASGI application" not in log
