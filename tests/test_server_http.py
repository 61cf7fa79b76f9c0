"""A real `python -m server` (uvicorn) subprocess on 127.0.0.1 whose engine steps take at least 10 ms
(tests/server_fixtures.SLOW_STEPS), so a request is surely in flight when the test acts: concurrent
mixed-depth requests give the same greedy text as alone and as generate(), and seeded sampled ones
the same text as alone; streaming is incremental (chunks arrive while the request is still being
generated); a client that disconnects (mid-stream or while waiting for a plain response) frees its
slot within a few steps; settings come from flags and MESH_* variables. Also the CLI's --help and
one-line errors.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import ServerProcess, ServerStartError
from benchmarks.loadgen import offer, send
from model import MeshForCausalLM
from server import __main__ as cli
from server_fixtures import SLOW_STEPS, STEP_S, reference_greedy, one_torch_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["First Citizen:", "All: Speak", "To be, or not", "The quick brown fox"]
# Steps the server may still run for a request after its client has gone (the event loop notices the
# disconnect, the engine drops the row at its next step boundary). At >= 10 ms a step, generous.
LATE_STEPS = 10
ABORTED = ("mesh_requests_total", (("finish_reason", "abort"), ("status", "499")))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    env = {"MESH_MAX_MODEL_LEN": "240", "MESH_PORT": "1", "MESH_KV_CACHE_MB": "64"}
    args = ["--model", str(ckpt), "--max-batch-size", "8", "--max-waiting", "16", "--log-level", "warning"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log", env=env, code=SLOW_STEPS)
    with proc:
        yield proc
        assert proc.terminate() == 0, "the server exits cleanly on SIGTERM"


def generated(m: dict) -> float:
    return sum(v for (name, _), v in m.items() if name == "mesh_generation_tokens_total")


def test_settings_from_flags_and_environment(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == 240  # MESH_MAX_MODEL_LEN
    assert server.metrics()[("mesh_max_waiting", ())] == 16  # --max-waiting
    # MESH_PORT=1 was set too: the --port flag won, or we would not be talking to it.


async def _alone_and_together(url: str, bodies: list[dict], watch) -> tuple[list[dict], list[dict]]:
    alone = [await send(url, b) for b in bodies]  # one at a time
    watcher = asyncio.ensure_future(watch())
    together = await offer(url, bodies)  # all at once: one busy mixed-depth batch
    watcher.cancel()
    return alone, together


def test_concurrent_mixed_depth_requests_match_alone_and_generate(server, ckpt):
    """Greedy requests equal generate() and themselves alone; seeded sampled ones (temperature 1.5,
    top_p 0.9) equal themselves alone, however the busy batch around them is made up."""
    model = MeshForCausalLM.from_pretrained(str(ckpt)).eval()
    N = 32
    greedy = [(p, k, stream) for k in (1, 2, 3, 4) for p, stream in zip(PROMPTS[:2], (False, True))]
    sampled = [(PROMPTS[0], k, k % 2 == 0) for k in (1, 2, 3, 4)]  # greedy[2k-2] is its greedy twin
    bodies = [{"prompt": p, "max_tokens": N, "temperature": 0, "loops": k, "ignore_eos": True, "stream": stream}
              for p, k, stream in greedy]
    bodies += [{"prompt": p, "max_tokens": N, "temperature": 1.5, "top_p": 0.9, "seed": 1234, "loops": k,
                "ignore_eos": True, "stream": stream} for p, k, stream in sampled]
    peak = {"mesh_requests_running": 0.0, "mesh_kv_cache_usage_ratio": 0.0}

    async def watch():
        while True:
            m = await asyncio.to_thread(server.metrics)
            for name in peak:
                peak[name] = max(peak[name], m[(name, ())])
            await asyncio.sleep(0.02)

    alone, together = asyncio.run(_alone_and_together(server.url, bodies, watch))
    assert all(r["ok"] for r in alone + together), [r["error"] for r in alone + together if not r["ok"]]
    assert peak["mesh_requests_running"] >= 6, f"requests did not run together ({peak})"
    assert 0 < peak["mesh_kv_cache_usage_ratio"] <= 1
    texts = [r["texts"][0] for r in together]
    for (p, k, stream), text, single in zip(greedy, texts, alone):
        ids = httpx.post(server.url + "/tokenize", json={"prompt": p}).json()["tokens"]
        ref, reliable = reference_greedy(model, ids, k, N)
        assert reliable == N, "a near-tie in the random model: pick another prompt"
        assert text == httpx.post(server.url + "/detokenize", json={"tokens": ref}).json()["prompt"], (p, k, stream)
        assert text == single["texts"][0], (p, k, stream)
    assert len(set(texts[:len(greedy)][::2])) == 4, "each depth its own greedy text"
    for (p, k, stream), text, single in zip(sampled, texts[len(greedy):], alone[len(greedy):]):
        assert text == single["texts"][0], ("seeded sampling depends on the batch", p, k, stream)
        assert text != texts[greedy.index((p, k, False))], ("the sampled request was decoded greedily", k)


def test_streaming_arrives_incrementally(server):
    """The first chunk arrives while most of the request is still to be generated, and the chunks are
    spread over the request's decode time (one step at least 10 ms), not sent together at the end."""
    N = 200
    body = {"prompt": PROMPTS[0], "max_tokens": N, "temperature": 0, "loops": 4, "ignore_eos": True, "stream": True}
    before = generated(server.metrics())
    times, at_first = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
                if at_first is None:
                    at_first = generated(server.metrics()) - before
    assert generated(server.metrics()) - before == N
    assert at_first < N / 2, f"the first chunk came after {at_first:.0f} of {N} tokens were generated"
    assert len(times) > N / 2, "about one chunk per token"
    assert times[-1] - times[0] >= 0.5 * (N - 1) * STEP_S, "the chunks came together, not as they were made"


def _stopped_within(server, before: dict, client_saw: int, timeout: float = 30.0) -> float:
    """Waits until nothing runs or waits (a hang guard, not a timing check), then checks that the aborted
    request made at most LATE_STEPS tokens after its client left and that generation has stopped;
    returns the tokens it made in all."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if m[("mesh_requests_running", ())] == 0 and m[("mesh_requests_waiting", ())] == 0:
            break
        assert time.time() < deadline, f"the running batch did not empty: {m}"
        time.sleep(0.02)
    made = generated(m) - generated(before)
    assert m[ABORTED] - before.get(ABORTED, 0) == 1
    assert made <= client_saw + LATE_STEPS, f"{made} tokens made, the client had {client_saw} when it left"
    time.sleep(5 * STEP_S)
    after = server.metrics()
    assert generated(after) == generated(m), "generation went on after the row was freed"
    assert after[("mesh_kv_cache_usage_ratio", ())] == 0
    return made


def test_disconnect_mid_stream_frees_the_slot_within_a_few_steps(server):
    before = server.metrics()
    body = {"prompt": PROMPTS[1], "max_tokens": 230, "temperature": 0, "loops": 4, "ignore_eos": True, "stream": True}
    n = 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n == 3:
                break  # leaving the block closes the connection mid-stream
    _stopped_within(server, before, client_saw=3)


def test_disconnect_while_waiting_for_a_plain_response_frees_the_slot(server):
    before = server.metrics()
    body = {"prompt": PROMPTS[2], "max_tokens": 230, "temperature": 0, "loops": 4, "ignore_eos": True}
    sent = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.05))
    waited = time.perf_counter() - sent
    # The client waited `waited` s: at most one token per STEP_S of it, then LATE_STEPS more at most.
    _stopped_within(server, before, client_saw=int(waited / STEP_S) + 1)
    # and the server serves the next request normally
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 3})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_http_throughput_script(server, tmp_path):
    spec = importlib.util.spec_from_file_location("http_throughput", ROOT / "scripts" / "http_throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.json"
    argv = ["--url", server.url, "--concurrency", "1", "3", "--loops", "1", "4", "--requests", "3", "--max-tokens", "5",
            "--repeat", "3", "--out", str(out)]
    assert script.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["loops"], r["concurrency"]) for r in results] == [(1, 1), (1, 3), (4, 1), (4, 3)]
    assert all(r["output_tokens"] == 15 and r["errors"] == 0 and r["tokens_per_s"] > 0 for r in results)
    assert all(sorted(r["tokens_per_s_runs"])[1] == r["tokens_per_s"] for r in results), "the median of 3 runs"
    assert script.main(["--url", "http://127.0.0.1:1"]) == 2, "no server: a one-line error"


# ---- the CLI -------------------------------------------------------------------------------------
def test_a_failed_start_reports_the_servers_log(tmp_path):
    proc = ServerProcess(["--model", str(tmp_path / "missing")], tmp_path / "server.log")
    with pytest.raises(ServerStartError, match=r"exited with status 2(.|\n)*python -m server: error: .*does not exist"):
        proc.wait_ready(timeout=120)
    assert proc.proc.poll() == 2


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
