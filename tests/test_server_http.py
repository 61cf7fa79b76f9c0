"""A real `python -m server` (uvicorn) subprocess on 127.0.0.1: concurrent mixed-depth requests give
the same greedy text as alone and as generate(), streaming is incremental, a client that disconnects
(mid-stream or while waiting for a plain response) frees its slot at once, and settings come from
flags and MESH_* variables. Also the CLI's --help and one-line errors.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model import MeshForCausalLM
from server import __main__ as cli
from server_fixtures import build_checkpoint, reference_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["First Citizen:", "All: Speak", "To be, or not", "The quick brown fox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "MESH_MAX_MODEL_LEN": "240", "MESH_PORT": "1", "MESH_KV_CACHE_MB": "64"}
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(ckpt), "--port", str(port), "--max-batch-size", "8",
         "--max-waiting", "16", "--threads", "1", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail(f"server did not start:\n{log.read()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    assert proc.wait(timeout=20) == 0, "the server exits cleanly on SIGTERM"
    log.close()


def scrape(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def generated(m: dict) -> float:
    return sum(v for (name, _), v in m.items() if name == "mesh_generation_tokens_total")


async def complete(client: httpx.AsyncClient, body: dict) -> str:
    if not body.get("stream"):
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
    return "".join(text)


def test_settings_from_flags_and_environment(server):
    card = httpx.get(server + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == 240  # MESH_MAX_MODEL_LEN
    m = scrape(server)
    assert m[("mesh_max_waiting", ())] == 16  # --max-waiting
    # MESH_PORT=1 was set too: the --port flag won, or we would not be talking to it.


def test_concurrent_mixed_depth_requests_match_alone_and_generate(server, ckpt):
    model = MeshForCausalLM.from_pretrained(str(ckpt)).eval()
    jobs = [(p, k, stream) for k in (1, 2, 3, 4) for p, stream in zip(PROMPTS[:2], (False, True))]
    N = 32

    def body(p, k, stream):
        return {"prompt": p, "max_tokens": N, "temperature": 0, "loops": k, "ignore_eos": True, "stream": stream}

    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            alone = {(p, k): await complete(client, body(p, k, False)) for p, k, _ in jobs}  # one at a time
            peak = {"mesh_requests_running": 0.0, "mesh_kv_cache_usage_ratio": 0.0}

            async def watch():
                while True:
                    r = await client.get("/metrics")
                    for line in r.text.splitlines():
                        name, _, value = line.partition(" ")
                        if name in peak:
                            peak[name] = max(peak[name], float(value))
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
            together = await asyncio.gather(*(complete(client, body(*job)) for job in jobs))
            watcher.cancel()
            return alone, together, peak

    alone, together, peak = asyncio.run(go())
    assert peak["mesh_requests_running"] >= 3, f"requests did not run together ({peak})"
    assert 0 < peak["mesh_kv_cache_usage_ratio"] <= 1
    for (p, k, stream), text in zip(jobs, together):
        ids = httpx.post(server + "/tokenize", json={"prompt": p}).json()["tokens"]
        ref, reliable = reference_greedy(model, ids, k, N)
        assert reliable == N, "a near-tie in the random model: pick another prompt"
        assert text == httpx.post(server + "/detokenize", json={"tokens": ref}).json()["prompt"], (p, k, stream)
        assert text == alone[(p, k)], (p, k, stream)
    assert len({t for (p, k, _), t in zip(jobs, together) if p == PROMPTS[0]}) == 4, "each depth its own text"


def test_streaming_arrives_incrementally(server):
    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            times = []
            body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "loops": 4, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        times.append(time.perf_counter())
            return times

    times = asyncio.run(go())
    assert len(times) > 20
    assert times[-1] - times[0] > 0.01, "chunks were sent as they were made, not all at the end"


def test_disconnect_mid_stream_frees_the_slot_at_once(server):
    before = scrape(server)
    aborted = ("mesh_requests_total", (("finish_reason", "abort"), ("status", "499")))

    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            body = {"prompt": PROMPTS[1], "max_tokens": 230, "temperature": 0, "loops": 4, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n == 3:
                        break  # leaving the block closes the connection mid-stream
            assert httpx.get(server + "/metrics").status_code == 200

    asyncio.run(go())
    wait_idle(server)
    after = scrape(server)
    assert after[aborted] - before.get(aborted, 0) == 1
    assert generated(after) - generated(before) < 200, "generation stopped when the client left"
    assert after[("mesh_kv_cache_usage_ratio", ())] == 0


def test_disconnect_while_waiting_for_a_plain_response_frees_the_slot(server):
    before = scrape(server)
    body = {"prompt": PROMPTS[2], "max_tokens": 230, "temperature": 0, "loops": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.05))
    wait_idle(server)
    after = scrape(server)
    aborted = ("mesh_requests_total", (("finish_reason", "abort"), ("status", "499")))
    assert after[aborted] - before.get(aborted, 0) == 1
    assert generated(after) - generated(before) < 200
    # and the server serves the next request normally
    assert httpx.post(server + "/v1/completions", json={**body, "max_tokens": 3}).json()["usage"]["completion_tokens"] == 3


def wait_idle(url: str, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = scrape(url)
        if m[("mesh_requests_running", ())] == 0 and m[("mesh_requests_waiting", ())] == 0:
            return
        time.sleep(0.02)
    pytest.fail("the running batch did not empty")


def test_http_throughput_script(server, tmp_path):
    spec = importlib.util.spec_from_file_location("http_throughput", ROOT / "scripts" / "http_throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.json"
    argv = ["--url", server, "--concurrency", "1", "3", "--loops", "1", "4", "--requests", "3", "--max-tokens", "5",
            "--repeat", "3", "--out", str(out)]
    assert script.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["loops"], r["concurrency"]) for r in results] == [(1, 1), (1, 3), (4, 1), (4, 3)]
    assert all(r["output_tokens"] == 15 and r["errors"] == 0 and r["tokens_per_s"] > 0 for r in results)
    assert all(sorted(r["tokens_per_s_runs"])[1] == r["tokens_per_s"] for r in results), "the median of 3 runs"
    assert script.main(["--url", "http://127.0.0.1:1"]) == 2, "no server: a one-line error"


# ---- the CLI -------------------------------------------------------------------------------------
def test_help_lists_every_flag_and_its_variable():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-batch-size", "--kv-cache-mb",
                 "--max-waiting", "--max-model-len"):
        assert flag in out.stdout and cli.env_name(flag) in out.stdout, flag


def test_environment_variables_and_flags(monkeypatch):
    monkeypatch.setenv("MESH_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("MESH_KV_CACHE_MB", "12.5")
    monkeypatch.setenv("MESH_MODEL", "")  # empty = the default model
    args = cli.parse_args([])
    assert (args.max_batch_size, args.kv_cache_mb, args.model, args.port, args.host) == (7, 12.5, None, 8000, "127.0.0.1")
    assert cli.parse_args(["--max-batch-size", "3"]).max_batch_size == 3, "the flag wins over the variable"
    monkeypatch.setenv("MESH_THREADS", "1")
    assert cli.parse_args([]).threads == 1 and cli.parse_args(["--threads", "2"]).threads == 2


@pytest.mark.parametrize("argv,env,needle", [
    (["--model", "/no/such/dir"], {}, "does not exist"),
    ([], {"MESH_PORT": "eighty"}, "MESH_PORT"),
    (["--dtype", "float8"], {}, "--dtype"),
    (["--port", "70000"], {}, "--port"),
    (["--max-batch-size", "0"], {}, "max_batch_size"),
    (["--threads", "-1"], {}, "--threads"),
])
def test_bad_settings_give_a_one_line_error(argv, env, needle, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err.splitlines()[-1] and "Traceback" not in err, err
