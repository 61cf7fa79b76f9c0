"""Engine v2 against the engine before it (issue 11), in one run: admission at a small K/V budget,
prefix-cache time to first token, chunked prefill among running streams (a --max-num-batched-tokens
sweep), decode tokens/s at batch 1 and 32 with a profile of both, and a 1,000-request HTTP soak.

    python -m benchmarks.engine_v2 --out /tmp/v2.json                   # everything, baseline 5ede606
    python -m benchmarks.engine_v2 --targets decode,profile --out d.json
    python -m benchmarks.run --sections engine_v2 --out docs/benchmarks-engine-v2.json   # the make bench section

Each engine runs in its own worker process, `python benchmarks/engine_v2.py --role worker`, with
PYTHONPATH set to its tree (this checkout, or a git worktree of --baseline-ref), so that `server` and
`model` come from that tree. The parent sends one task at a time as a JSON line on the worker's stdin
and reads the answer from its stdout, alternating the two engines, so they never run at once and a
change of load on the shared machine hits both alike. The worker part of this file imports nothing
from `benchmarks` (the baseline tree has an older one): only torch, `server.engine` and `model`.
Both engines take the same synchronous API (Engine, EngineConfig, add_request, step, has_work);
config fields a tree does not have (block_size, enable_prefix_caching in the baseline) are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "5ede606"  # the commit before Engine v2
TARGETS = ("admission", "prefix", "chunked", "decode", "profile", "soak")

# Knobs per plan. full: the issue's figures; quick: the same shapes, fewer repetitions; tiny: a tiny
# random checkpoint and a few steps (the smoke test).
PLANS = {
    "full": dict(admission=dict(requests=64, prompt_len=8, max_tokens=200, stop_at=20, kv_cache_mb=16.0),
                 prefix=dict(prefix_len=1024, suffix_len=16, rounds=3),
                 chunked=dict(streams=16, long_len=2000, pre_steps=24, budgets=(32, 64, 128, 256, 512), rounds=2),
                 decode=dict(batches=(1, 32), prompt_lens=(16, 160), steps=(64, 24), warm=4, rounds=6, kv_cache_mb=256.0),
                 profile=dict(cases=((1, 16), (32, 16), (32, 160)), steps=16, top=10, kv_cache_mb=256.0,
                              lengths=(1, 16, 32, 64, 128, 240)),
                 soak=dict(requests=1000, first=200, kv_cache_mb=64.0, concurrency=32)),
    "quick": dict(admission=dict(requests=64, prompt_len=8, max_tokens=200, stop_at=20, kv_cache_mb=16.0),
                  prefix=dict(prefix_len=1024, suffix_len=16, rounds=2),
                  chunked=dict(streams=16, long_len=2000, pre_steps=16, budgets=(64, 256), rounds=1),
                  decode=dict(batches=(1, 32), prompt_lens=(16, 160), steps=(32, 12), warm=2, rounds=3, kv_cache_mb=256.0),
                  profile=dict(cases=((1, 16), (32, 160)), steps=8, top=8, kv_cache_mb=256.0, lengths=(1, 16, 64, 240)),
                  soak=dict(requests=300, first=100, kv_cache_mb=64.0, concurrency=32)),
    "tiny": dict(admission=dict(requests=8, prompt_len=8, max_tokens=40, stop_at=6, kv_cache_mb=0.25),
                 prefix=dict(prefix_len=64, suffix_len=8, rounds=1),
                 chunked=dict(streams=3, long_len=120, pre_steps=4, budgets=(16, 64), rounds=1),
                 decode=dict(batches=(1, 4), prompt_lens=(8, 40), steps=(4, 4), warm=1, rounds=1, kv_cache_mb=4.0),
                 profile=dict(cases=((4, 8),), steps=2, top=5, kv_cache_mb=4.0, lengths=(1, 8)),
                 soak=dict(requests=24, first=8, kv_cache_mb=2.0, concurrency=4)),
}
LOOPS = 3  # the default model's default depth; every target runs at it
TWIN_CONTEXT = 2048  # the random-weight twin's max_position_embeddings (prefix and chunked targets)


# =============================================================================================
# The worker: one engine tree, tasks from stdin. Imports server/model lazily (from its PYTHONPATH).
# =============================================================================================
_MODELS: dict = {}


def _model(path: str):
    """(model, tokenizer) of a checkpoint, loaded once per path by this tree's loader."""
    import torch
    from server.engine import load

    if path not in _MODELS:
        _MODELS[path] = load(path, torch.device("cpu"), torch.float32)
    return _MODELS[path]


def _engine(path: str, config: dict):
    """An Engine of this tree around a cached model, without Prometheus."""
    import dataclasses

    from server.engine import Engine, EngineConfig

    model, tok = _model(path)
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    cfg = EngineConfig(device="cpu", dtype="float32", **{k: v for k, v in config.items() if k in names})
    return Engine(cfg, model=model, tokenizer=tok, metrics=False)


def _params(**kw):
    from server.engine import SamplingParams

    return SamplingParams(temperature=0.0, **kw)


def _step(engine, times: dict) -> list:
    """One engine step; appends the step's end time to times[seq id] for every sequence that got a token."""
    outs = engine.step()
    now = time.perf_counter()
    for o in outs:
        if o.token_ids:
            times.setdefault(o.seq.id, []).append(now)
    return outs


def _kv_bytes(engine) -> int:
    """K/V bytes the engine holds now: used blocks (new engine) or allocated buffers (baseline)."""
    if hasattr(engine, "blocks"):
        return engine.blocks.num_used * engine.kv.nbytes // engine.kv.num_units
    return engine.pool.allocated_bytes()


def task_info() -> dict:
    """Which engine this worker imported, and whether it is the paged one (a package with block_manager.py)."""
    import torch
    import server.engine as se

    paged = (Path(se.__file__).parent / "block_manager.py").is_file() and hasattr(se, "__path__")
    return {"engine_file": se.__file__, "torch_threads": torch.get_num_threads(), "paged": paged}


def task_stops(model: str, prompts: list, stop_at: int, loops: int) -> dict:
    """For each prompt, a stop string from its own greedy continuation: the text of a few tokens ending
    near token `stop_at` that first occurs there (2-token windows first, then longer ones, which are
    rarer), so the request stops there in any engine that decodes greedily alike. None where no window
    ending by token stop_at + 12 qualifies."""
    engine = _engine(model, {})
    outs = engine.generate(prompts, _params(max_tokens=stop_at + 12, ignore_eos=True, detokenize=False), loops=loops)
    stops, at = [], []
    for c in outs:
        found = _first_window(engine.decode, c.token_ids, stop_at)
        stops.append(found[0] if found else None)
        at.append(found[1] if found else None)
    return {"stops": stops, "stop_tokens": at}


def _first_window(decode, ids: list, stop_at: int):
    """(text of ids[j:end], end) for the first window, by width then end, whose text is not blank and
    first occurs in decode(ids) where it starts; None if none does."""
    full = decode(ids)
    for width in (2, 3, 4, 6):
        for end in range(stop_at, len(ids) + 1):
            head, window = decode(ids[: end - width]), decode(ids[:end])
            piece = window[len(head):] if window.startswith(head) else ""
            if piece.strip() and full.find(piece) == len(head):
                return piece, end
    return None


def task_admission(model: str, prompts: list, stops: list, max_tokens: int, loops: int, config: dict) -> dict:
    """All requests offered at once; steps to the end. The most running at once (after a step), the
    peak K/V bytes held, steps and tokens."""
    engine = _engine(model, config)
    seqs = []
    for ids, stop in zip(prompts, stops):
        seqs += engine.add_request([ids], _params(max_tokens=max_tokens, stop=(stop,) if stop else ()), loops=loops)
    most = steps = peak = 0
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
        most = max(most, len(engine.scheduler.running))
        peak = max(peak, _kv_bytes(engine))
    return {"most_running": most, "steps": steps, "seconds": time.perf_counter() - t0, "peak_kv_bytes": peak,
            "tokens": [s.output_ids for s in seqs], "reasons": [s.finish_reason for s in seqs],
            "preemptions": sum(getattr(s, "num_preemptions", 0) for s in seqs)}


def _ttft(engine, ids: list, loops: int) -> tuple[float, int]:
    """Seconds from add_request to the step that gives this prompt's first token; and that token."""
    t0 = time.perf_counter()
    (seq,) = engine.add_request([ids], _params(max_tokens=1, ignore_eos=True, detokenize=False), loops=loops)
    while not seq.output_ids:
        engine.step()
    dt = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return dt, seq.output_ids[0]


def task_prefix(model: str, prefixes: list, suffixes: list, loops: int, config: dict) -> dict:
    """Per round: prefix + suffix A (cold: the prefix is new), then prefix + suffix B (a hit where the
    engine caches prefixes). Prompt tokens looked up and hit at each admission, where the engine says."""
    engine = _engine(model, config)
    admitted: list = []
    inner = getattr(engine.scheduler, "on_admit", None)
    if inner is not None:  # the new engine's hook: (sequence, prompt tokens looked up, tokens hit)
        def on_admit(seq, queried, hit):
            admitted.append((queried, hit))
            inner(seq, queried, hit)

        engine.scheduler.on_admit = on_admit
    _ttft(engine, prefixes[0][:8], loops)  # warm-up: first-call allocations out of the timings
    admitted.clear()
    rows = []
    for prefix, (a, b) in zip(prefixes, suffixes):
        cold, _ = _ttft(engine, prefix + a, loops)
        hit, _ = _ttft(engine, prefix + b, loops)
        rows.append({"cold_s": cold, "hit_s": hit})
    return {"rows": rows, "admissions": admitted}


def task_chunked(model: str, streams: list, long_ids: list, pre_steps: int, stream_tokens: int, loops: int,
                 config: dict) -> dict:
    """The long prompt alone (a fresh engine), then among running streams (another fresh engine, so no
    prefix-cache hit): the streams' token times before and while it prefills, and its TTFT."""
    alone, _ = _ttft(_engine(model, config), long_ids, loops)
    engine = _engine(model, config)
    seqs = engine.add_request(streams, _params(max_tokens=stream_tokens, ignore_eos=True, detokenize=False), loops=loops)
    times: dict = {}
    while any(not s.output_ids for s in seqs):
        _step(engine, times)
    for _ in range(pre_steps):
        _step(engine, times)
    arrive = time.perf_counter()
    (long,) = engine.add_request([long_ids], _params(max_tokens=2, ignore_eos=True, detokenize=False), loops=loops)
    steps = 0
    while not long.output_ids:
        _step(engine, times)
        steps += 1
    first = times[long.id][0]
    for _ in range(2):  # the streams' next tokens: a gap that spans the prefill ends after `first`
        _step(engine, times)
    if any(s.finish_reason is not None for s in seqs):
        raise RuntimeError("a stream finished before the long prompt's first token: raise stream_tokens")
    before, during = [], []
    for s in seqs:
        ts = times[s.id]
        for a, b in zip(ts, ts[1:]):
            if b <= arrive:
                before.append(b - a)
            elif a < first:  # overlaps the prefill: from its arrival to its first token
                during.append(b - a)
    return {"ttft_alone_s": alone, "ttft_s": first - arrive, "prefill_steps": steps, "gaps_before_s": before,
            "gaps_during_s": during}


def _decoding(model: str, prompts: list, steps: int, warm: int, loops: int, config: dict):
    """An engine whose rows are all past their prompt and `warm` steps into decoding."""
    engine = _engine(model, config)
    seqs = engine.add_request(prompts, _params(max_tokens=steps + warm + 8, ignore_eos=True, detokenize=False),
                              loops=loops)
    while any(not s.output_ids for s in seqs):
        engine.step()
    for _ in range(warm):
        engine.step()
    return engine, seqs


def task_decode(model: str, prompts: list, steps: int, warm: int, loops: int, config: dict) -> dict:
    """Seconds for `steps` consecutive decode steps of len(prompts) rows; the first row's greedy tokens."""
    engine, seqs = _decoding(model, prompts, steps, warm, loops, config)
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(engine.step()) != len(seqs):
            raise RuntimeError("a timed decode step did not give every row a token")
    return {"seconds": time.perf_counter() - t0, "tokens": steps * len(seqs), "first_row": seqs[0].output_ids}


# Engine-level methods timed by task_profile where a tree has them (nested ones are counted in both).
_PARTS = (("scheduler", "schedule"), ("runner", "run"), ("runner", "decode"), ("kv", "begin_decode"),
          ("pool", "begin_decode"), (None, "_postprocess"), (None, "_sample_and_emit"))


def _time_parts(engine) -> dict:
    """Wraps the engine's parts (instance attributes, so internal self.x() calls go through them)."""
    spent: dict = {}
    for owner_name, name in _PARTS:
        owner = engine if owner_name is None else getattr(engine, owner_name, None)
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None:
            continue
        label = f"{owner_name}.{name}" if owner_name else f"engine.{name}"

        def timed(*a, _fn=fn, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
    return spent


def task_profile(model: str, prompts: list, steps: int, loops: int, config: dict, top: int) -> dict:
    """Where a decode step's time goes: torch.profiler's top operators by self CPU time, and the engine's
    parts (schedule, model run, sampling) timed over the same steps, all per step."""
    import torch

    engine, seqs = _decoding(model, prompts, steps, 2, loops, config)
    spent = _time_parts(engine)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return {"ms_per_step": 1e3 * wall / steps, "ops": ops,
            "parts_ms_per_step": {k: 1e3 * v / steps for k, v in spent.items()}}


def task_forward_cost(model: str, lengths: list, loops: int, reps: int) -> dict:
    """Median ms of one plain forward of (1, T) tokens per T: what a prompt chunk of T tokens costs with no
    past, i.e. how much of a forward does not grow with its tokens (the weights are read once per forward)."""
    import statistics

    import torch

    m, _ = _model(model)
    out = {}
    with torch.inference_mode():
        for T in lengths:
            ids = torch.randint(2, m.config.vocab_size, (1, T))
            m(ids, loops=loops)
            xs = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m(ids, loops=loops)
                xs.append(time.perf_counter() - t0)
            out[str(T)] = 1e3 * statistics.median(xs)
    return out


TASKS = {name[5:]: fn for name, fn in globals().items() if name.startswith("task_")}


def worker_main(threads: int) -> int:
    """Answers tasks, one JSON line in -> one JSON line out ({"ok", "result"} or {"ok": false, "error"})."""
    import torch

    torch.set_num_threads(threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else a task prints must not corrupt the answers
    for line in sys.stdin:
        req = json.loads(line)
        try:
            answer = {"ok": True, "result": TASKS[req.pop("task")](**req)}
        except Exception:
            answer = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


# =============================================================================================
# The parent: workers, inputs, the targets, the report.
# =============================================================================================
class Worker:
    """A worker process on one tree; `call(task, **kw)` returns its result or raises with its traceback."""

    def __init__(self, name: str, tree: Path, threads: int, log_path: Path):
        self.name, self.tree = name, tree
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", "worker",
                                      "--threads", str(threads)], cwd=tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.log_path = log_path

    def call(self, task: str, **kw):
        self.proc.stdin.write(json.dumps({"task": task, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited; its log:\n{self.log_path.read_text()[-4000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{self.name} worker, task {task}:\n{answer['error']}")
        return answer["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def baseline_tree(ref: str | None) -> Path:
    """A git worktree of `ref` (made once, reused), or this checkout when ref is None (the smoke test)."""
    if ref is None:
        return ROOT
    sha = subprocess.run(["git", "rev-parse", "--short", ref + "^{commit}"], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"benchmarks.engine_v2: error: --baseline-ref {ref!r} is not a commit of this repository")
    path = Path("/tmp") / f"mesh-baseline-{sha.stdout.strip()}"
    if not (path / "server").is_dir():
        made = subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"benchmarks.engine_v2: error: git worktree add {path} {ref}: {made.stderr.strip()}")
    return path


def tree_state(tree: Path) -> dict:
    """The commit measured as "new", and whether server/ or model/ had uncommitted changes then."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": git("status", "--short", "--", "server", "model")}


def make_models(tiny: bool, work: Path, seed: int) -> dict:
    """{"default": model/default (tiny: a tiny checkpoint), "twin": random weights, the default model's
    config with a TWIN_CONTEXT-token context (tiny: the tiny checkpoint)}; both engines load these paths."""
    if tiny:
        from .tiny import build_checkpoint

        path = str(build_checkpoint(work / "tiny", max_position_embeddings=512, seed=seed))
        return {"default": path, "twin": path}
    import shutil

    import torch

    from model import DEFAULT_MODEL, MeshConfig, MeshForCausalLM

    cfg = MeshConfig.from_pretrained(str(DEFAULT_MODEL))
    cfg.max_position_embeddings = TWIN_CONTEXT
    torch.manual_seed(seed)
    twin = work / "twin"
    MeshForCausalLM(cfg).save_pretrained(str(twin))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, twin / name)
    return {"default": str(DEFAULT_MODEL), "twin": str(twin)}


def text_prompts(model: str, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of `length` tokens: windows of encoded text (tinyshakespeare when at hand)."""
    import random

    from tokenizers import Tokenizer

    from .common import LINES, SHAKESPEARE

    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000] if SHAKESPEARE.is_file() else " ".join(LINES * 40)
    ids = Tokenizer.from_file(str(Path(model) / "tokenizer.json")).encode(text).ids
    rng = random.Random(seed)
    return [ids[s : s + length] for s in (rng.randrange(len(ids) - length) for _ in range(n))]


def random_ids(rng, n: int, vocab: int = 2048) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(n)]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def median(xs) -> float:
    import statistics

    return float(statistics.median(xs)) if xs else float("nan")


def vocab_of(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def pair(workers: dict, rnd: int) -> list:
    """The two workers in ABBA order over rounds: neither always goes first."""
    names = ["baseline", "new"] if rnd % 2 == 0 else ["new", "baseline"]
    return [(n, workers[n]) for n in names]


# ---- the targets ----------------------------------------------------------------------------
def run_admission(workers: dict, models: dict, p: dict, seed: int) -> dict:
    prompts = text_prompts(models["default"], p["requests"], p["prompt_len"], seed)
    stops = workers["new"].call("stops", model=models["default"], prompts=prompts, stop_at=p["stop_at"], loops=LOOPS)
    config = dict(kv_cache_mb=p["kv_cache_mb"], block_size=16)
    out = {"budget_mb": p["kv_cache_mb"], "requests": p["requests"], "prompt_len": p["prompt_len"],
           "max_tokens": p["max_tokens"], "stop_at": p["stop_at"],
           "stops_found": sum(s is not None for s in stops["stops"])}
    for name, w in pair(workers, 0):
        r = w.call("admission", model=models["default"], prompts=prompts, stops=stops["stops"],
                   max_tokens=p["max_tokens"], loops=LOOPS, config=config)
        out[name] = {k: v for k, v in r.items() if k not in ("tokens", "reasons")}
        out[name]["mean_tokens"] = sum(map(len, r["tokens"])) / len(r["tokens"])
        out[name]["stopped"] = r["reasons"].count("stop")
        out[name]["_tokens"] = r["tokens"]
    same = sum(a == b for a, b in zip(out["new"].pop("_tokens"), out["baseline"].pop("_tokens")))
    out["identical_outputs"] = same
    out["running_ratio"] = ratio(out["new"]["most_running"], out["baseline"]["most_running"])
    return out


def run_prefix(workers: dict, models: dict, p: dict, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    vocab = vocab_of(models["twin"])
    prefixes = [random_ids(rng, p["prefix_len"], vocab) for _ in range(p["rounds"])]
    suffixes = [(random_ids(rng, p["suffix_len"], vocab), random_ids(rng, p["suffix_len"], vocab)) for _ in prefixes]
    out = {"prefix_len": p["prefix_len"], "suffix_len": p["suffix_len"], "rounds": p["rounds"]}
    for name, w in pair(workers, 0):
        r = w.call("prefix", model=models["twin"], prefixes=prefixes, suffixes=suffixes, loops=LOOPS, config={})
        cold, hit = [x["cold_s"] for x in r["rows"]], [x["hit_s"] for x in r["rows"]]
        out[name] = {"ttft_cold_ms": 1e3 * median(cold), "ttft_hit_ms": 1e3 * median(hit),
                     "cold_over_hit": median([c / h for c, h in zip(cold, hit)]), "rows": r["rows"]}
        if r["admissions"]:
            q, h = sum(a[0] for a in r["admissions"]), sum(a[1] for a in r["admissions"])
            out[name].update(query_tokens=q, hit_tokens=h, hit_rate=ratio(h, q),
                             hit_tokens_on_hits=[a[1] for a in r["admissions"][1::2]])
    return out


def _gap_summary(r: dict) -> dict:
    """The issue's figures (the largest gap, one sample, takes any burst of load on the machine) and the
    median gap during the prefill (what every step of it costs the streams)."""
    before, during = median(r["gaps_before_s"]), max(r["gaps_during_s"], default=float("nan"))
    typical = median(r["gaps_during_s"])
    return {"ttft_ms": 1e3 * r["ttft_s"], "ttft_alone_ms": 1e3 * r["ttft_alone_s"],
            "ttft_over_alone": ratio(r["ttft_s"], r["ttft_alone_s"]), "median_gap_before_ms": 1e3 * before,
            "max_gap_during_ms": 1e3 * during, "max_gap_over_median": ratio(during, before),
            "median_gap_during_ms": 1e3 * typical, "median_during_over_before": ratio(typical, before),
            "prefill_steps": r["prefill_steps"]}


def run_chunked(workers: dict, models: dict, p: dict, seed: int) -> dict:
    """Every budget of the sweep on the new engine, and the baseline (prefill as one step) each round."""
    import random

    rng = random.Random(seed)
    vocab = vocab_of(models["twin"])
    streams = [random_ids(rng, 16, vocab) for _ in range(p["streams"])]
    long_ids = random_ids(rng, p["long_len"], vocab)
    runs: dict = {"baseline": []}
    for rnd in range(p["rounds"]):
        for name, w in pair(workers, rnd):
            for budget in (p["budgets"] if name == "new" else [None]):
                config = {"max_batch_size": p["streams"] + 1}  # the streams and the long prompt
                if budget is not None:
                    config["max_num_batched_tokens"] = budget
                lanes = max(1, (budget or p["long_len"]) - p["streams"])  # prompt tokens a step can carry
                r = w.call("chunked", model=models["twin"], streams=streams, long_ids=long_ids, loops=LOOPS,
                           pre_steps=p["pre_steps"], stream_tokens=p["pre_steps"] + p["long_len"] // lanes + 16,
                           config=config)
                runs.setdefault(name if budget is None else budget, []).append(_gap_summary(r))
    out = {"streams": p["streams"], "long_len": p["long_len"], "pre_steps": p["pre_steps"], "rounds": p["rounds"]}
    out["baseline"] = _median_rows(runs.pop("baseline"))
    out["sweep"] = [{"max_num_batched_tokens": b, **_median_rows(rs)} for b, rs in sorted(runs.items())]
    return out


def _median_rows(rows: list[dict]) -> dict:
    return {k: median([r[k] for r in rows]) for k in rows[0]}


def run_decode(workers: dict, models: dict, p: dict, seed: int) -> dict:
    """Rounds of every (prompt length, batch) x (baseline, new), ABBA; per case the median tok/s of each
    engine and the median of the per-round ratios. Two contexts: the baseline's rows attend over a
    buffer of at least 256 positions, the new engine's over the blocks a row holds."""
    cases = [(plen, batch, steps) for plen in p["prompt_lens"] for batch, steps in zip(p["batches"], p["steps"])]
    per = {c: {"baseline": [], "new": [], "first": {}} for c in cases}
    for rnd in range(p["rounds"]):
        for case in cases:
            plen, batch, steps = case
            prompts = text_prompts(models["default"], batch, plen, seed + batch)
            for name, w in pair(workers, rnd):
                r = w.call("decode", model=models["default"], prompts=prompts, steps=steps, warm=p["warm"],
                           loops=LOOPS, config=_decode_config(batch, plen, p["kv_cache_mb"]))
                per[case][name].append(r["tokens"] / r["seconds"])
                per[case]["first"][name] = r["first_row"]
    rows = []
    for case in cases:
        b, n, first = per[case]["baseline"], per[case]["new"], per[case]["first"]
        rows.append({"prompt_len": case[0], "batch": case[1], "steps": case[2], "baseline_tok_s": median(b),
                     "new_tok_s": median(n), "new_over_baseline": median([x / y for x, y in zip(n, b)]),
                     "rounds_new": n, "rounds_baseline": b, "greedy_identical": first["new"] == first["baseline"]})
    return {"rounds": p["rounds"], "loops": LOOPS, "warm": p["warm"], "rows": rows}


def _decode_config(batch: int, prompt_len: int, kv_cache_mb: float) -> dict:
    """Room for every prompt in one step, so all rows start decoding together in both engines (with the
    default budget the new engine's first rows would decode while later ones still prefill)."""
    return {"kv_cache_mb": kv_cache_mb, "max_num_batched_tokens": max(256, batch * (prompt_len + 1))}


def run_profile(workers: dict, models: dict, p: dict, seed: int) -> dict:
    out = {"steps": p["steps"], "cases": []}
    for batch, plen in p["cases"]:
        prompts = text_prompts(models["default"], batch, plen, seed)
        case = {"batch": batch, "prompt_len": plen}
        for name, w in pair(workers, 0):
            case[name] = w.call("profile", model=models["default"], prompts=prompts, steps=p["steps"], loops=LOOPS,
                                config=_decode_config(batch, plen, p["kv_cache_mb"]), top=p["top"])
        out["cases"].append(case)
    out["forward_ms_by_tokens"] = workers["new"].call("forward_cost", model=models["default"], lengths=list(p["lengths"]),
                                                      loops=LOOPS, reps=5)
    return out


def _vm(pid: int, field: str) -> float:
    """A /proc/<pid>/status memory field in MiB (VmRSS: resident now, VmHWM: the peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def soak_bodies(n: int, seed: int) -> list[dict]:
    """Mixed requests: depths 1-4, 8-64 new tokens, streamed or not, greedy or seeded sampling."""
    import random

    from .common import LINES

    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        body = {"prompt": " ".join(rng.sample(LINES, 2)), "max_tokens": rng.randint(8, 64), "loops": rng.randint(1, 4),
                "stream": i % 2 == 0, "temperature": 0.0 if i % 3 else 0.8, "seed": i}
        bodies.append(body)
    return bodies


def run_soak(models: dict, p: dict, seed: int, threads: int, work: Path) -> dict:
    """The new engine behind HTTP (python -m server, --kv-cache-mb B): RSS once loaded, after the first
    requests, after all of them, and the peak (VmHWM); HTTP statuses counted."""
    import asyncio

    from .harness import ServerProcess
    from .loadgen import offer

    bodies = soak_bodies(p["requests"], seed)
    args = ["--model", models["default"], "--device", "cpu", "--kv-cache-mb", str(p["kv_cache_mb"]), "--max-waiting", "1024"]
    statuses: dict = {}
    with ServerProcess(args, work / "soak-server.log", threads=threads) as server:
        loaded = _vm(server.pid, "VmRSS")
        t0 = time.perf_counter()
        rss = []
        for part in (bodies[: p["first"]], bodies[p["first"] :]):
            for r in asyncio.run(offer(server.url, part, concurrency=p["concurrency"])):
                statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
            rss.append(_vm(server.pid, "VmRSS"))
        seconds = time.perf_counter() - t0
        peak = _vm(server.pid, "VmHWM")
    fivexx = sum(c for s, c in statuses.items() if s.startswith("5"))
    return {"requests": p["requests"], "first": p["first"], "budget_mb": p["kv_cache_mb"], "concurrency": p["concurrency"],
            "seconds": seconds, "statuses": statuses, "errors_5xx": fivexx, "rss_loaded_mib": loaded,
            "rss_after_first_mib": rss[0], "rss_after_all_mib": rss[1], "rss_peak_mib": peak,
            "growth_mib": rss[1] - rss[0], "peak_over_loaded_mib": peak - loaded}


# ---- the whole section ----------------------------------------------------------------------
def run(plan: str = "full", targets=TARGETS, baseline_ref: str | None = BASELINE_REF, threads: int = 1,
        seed: int = 0, quiet: bool = False) -> dict:
    """Every target of `targets` on the baseline and the new engine; returns the results dict."""
    import tempfile

    p = PLANS[plan]
    work = Path(tempfile.mkdtemp(prefix="engine-v2-"))
    models = make_models(plan == "tiny", work, seed)
    trees = {"baseline": baseline_tree(baseline_ref), "new": ROOT}
    out: dict = {"plan": plan, "baseline_ref": baseline_ref or "this checkout", "loops": LOOPS, "threads": threads,
                 "load_average": {}, "seconds": {}}
    workers = {name: Worker(name, tree, threads, work / f"worker-{name}.log") for name, tree in trees.items()}
    try:
        out["engines"] = {name: w.call("info") for name, w in workers.items()}
        out["engines"]["new"].update(tree_state(ROOT))
        for target in targets:
            t0 = time.perf_counter()
            out["load_average"][target] = [round(x, 2) for x in os.getloadavg()]
            if not quiet:
                print(f"[engine_v2] {target} ...", file=sys.stderr, flush=True)
            try:
                if target == "soak":
                    out["soak"] = run_soak(models, p["soak"], seed, threads, work)
                else:
                    out[target] = RUNNERS[target](workers, models, p[target], seed)
            except Exception as e:  # the other targets still run and report; this one says why it has no numbers
                out.setdefault("errors", {})[target] = f"{type(e).__name__}: {e}"
                print(f"[engine_v2] {target} failed: {e}", file=sys.stderr, flush=True)
            out["seconds"][target] = round(time.perf_counter() - t0, 1)
    finally:
        for w in workers.values():
            w.close()
    out["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    out["targets"] = verdicts(out)
    return out


RUNNERS = {"admission": run_admission, "prefix": run_prefix, "chunked": run_chunked, "decode": run_decode,
           "profile": run_profile}

DEFAULT_BUDGET = 256  # the engine's default --max-num-batched-tokens: the sweep row the chunked verdict reads


def verdicts(r: dict) -> list[dict]:
    """One row per target of the issue that ran: what it asks, the measured value, met or not."""
    rows = []

    def add(name, target, value, met):
        rows.append({"target": name, "asks": target, "measured": value, "met": bool(met)})

    if "admission" in r:
        a = r["admission"]
        add("admission: most running at once, new / baseline", ">= 4", a["running_ratio"], a["running_ratio"] >= 4)
    if "prefix" in r:
        x = r["prefix"]["new"]
        add("prefix cache: TTFT cold / TTFT hit", ">= 5", x["cold_over_hit"], x["cold_over_hit"] >= 5)
    if "chunked" in r:
        sweep = r["chunked"]["sweep"]
        row = next((s for s in sweep if s["max_num_batched_tokens"] == DEFAULT_BUDGET), sweep[-1])
        b = row["max_num_batched_tokens"]
        add(f"chunked prefill ({b} tokens/step): max stream gap / median gap before", "<= 2",
            row["max_gap_over_median"], row["max_gap_over_median"] <= 2)
        add(f"chunked prefill ({b} tokens/step): long prompt TTFT / alone", "<= 1.5",
            row["ttft_over_alone"], row["ttft_over_alone"] <= 1.5)
    for d in r.get("decode", {}).get("rows", []):
        add(f"decode tok/s at batch {d['batch']} after {d['prompt_len']} prompt tokens, new / baseline", ">= 0.95",
            d["new_over_baseline"],
            d["new_over_baseline"] >= 0.95)
    if "soak" in r:
        s = r["soak"]
        add("soak: RSS after all - after the first (MiB)", "<= 50", s["growth_mib"], s["growth_mib"] <= 50)
        add("soak: peak RSS - loaded (MiB)", f"<= B + 64 = {s['budget_mb'] + 64:g}", s["peak_over_loaded_mib"],
            s["peak_over_loaded_mib"] <= s["budget_mb"] + 64)
        add("soak: 5xx responses", "0", s["errors_5xx"], s["errors_5xx"] == 0)
    return rows


# ---- the report -------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or x != x else fmt.format(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown(r: dict) -> str:
    """The section's tables (report.py prints them after the other sections)."""
    new = r.get("engines", {}).get("new", {})
    tree = (f"; new = {new['commit']}" + (" with uncommitted changes in server/ or model/" if new.get("uncommitted") else "")
            if "commit" in new else "")
    parts = [f"**Engine v2 against {r['baseline_ref']}{tree}** ({r['plan']}, depth {r['loops']}, {r['threads']} torch "
             f"thread(s) per engine; load average at each target's start: "
             + ", ".join(f"{k} {v[0]}" for k, v in r["load_average"].items()) + ")", ""]
    parts.append(_table(["target", "asks", "measured", "met"],
                        [[t["target"], t["asks"], _f(t["measured"]), "yes" if t["met"] else "**no**"] for t in r["targets"]]))
    for name in ("admission", "prefix", "chunked", "decode", "profile", "soak"):
        if name in r:
            parts += ["", SECTIONS_MD[name](r[name])]
    for name, why in r.get("errors", {}).items():
        parts += ["", f"{name}: no numbers, it failed: {why.splitlines()[0]}"]
    return "\n".join(parts)


def _md_admission(a: dict) -> str:
    head = (f"Admission: {a['requests']} requests at once, {a['prompt_len']}-token prompts, max_tokens "
            f"{a['max_tokens']}, a stop string after ~{a['stop_at']} tokens ({a['stops_found']} found), "
            f"{a['budget_mb']:g} MiB K/V; identical outputs {a['identical_outputs']}/{a['requests']}")
    rows = [[n, a[n]["most_running"], _f(a[n]["mean_tokens"], "{:.1f}"), a[n]["stopped"], a[n]["steps"],
             _f(a[n]["seconds"], "{:.1f}"), _f(a[n]["peak_kv_bytes"] / 2**20, "{:.1f}"), a[n]["preemptions"]]
            for n in ("baseline", "new")]
    return head + "\n\n" + _table(["engine", "most running", "mean tokens", "stopped", "steps", "seconds",
                                   "peak K/V MiB held", "preemptions"], rows)


def _md_prefix(x: dict) -> str:
    n = x["new"]
    head = (f"Prefix cache: {x['prefix_len']}-token shared prefix + {x['suffix_len']} own tokens, twin model, "
            f"median of {x['rounds']} rounds; new engine: {n.get('hit_tokens')} of {n.get('query_tokens')} "
            f"prompt tokens hit ({_f(n.get('hit_rate'), '{:.3f}')}), per hit {n.get('hit_tokens_on_hits')}")
    rows = [[e, _f(x[e]["ttft_cold_ms"], "{:.1f}"), _f(x[e]["ttft_hit_ms"], "{:.1f}"), _f(x[e]["cold_over_hit"])]
            for e in ("baseline", "new")]
    return head + "\n\n" + _table(["engine", "TTFT cold ms", "TTFT same prefix ms", "cold / same prefix"], rows)


def _md_chunked(c: dict) -> str:
    head = (f"Chunked prefill: a {c['long_len']}-token prompt arrives among {c['streams']} running streams "
            f"(twin model), median of {c['rounds']} round(s)")
    rows = [["baseline (one prefill step)", *_chunk_cells(c["baseline"])]]
    rows += [[f"new, --max-num-batched-tokens {s['max_num_batched_tokens']}", *_chunk_cells(s)] for s in c["sweep"]]
    return head + "\n\n" + _table(["engine", "median gap before ms", "median gap during ms", "during / before",
                                   "max gap during ms", "max / median before",
                                   "TTFT ms", "TTFT alone ms", "TTFT / alone", "prefill steps"], rows)


def _chunk_cells(s: dict) -> list:
    return [_f(s["median_gap_before_ms"], "{:.1f}"), _f(s["median_gap_during_ms"], "{:.1f}"),
            _f(s["median_during_over_before"]), _f(s["max_gap_during_ms"], "{:.1f}"), _f(s["max_gap_over_median"]),
            _f(s["ttft_ms"], "{:.0f}"), _f(s["ttft_alone_ms"], "{:.0f}"), _f(s["ttft_over_alone"]),
            _f(s["prefill_steps"], "{:.0f}")]


def _md_decode(d: dict) -> str:
    head = (f"Decode: default model at depth {d['loops']}, greedy, {d['warm']} warm-up steps, then the timed steps; "
            f"{d['rounds']} rounds alternating the engines (ABBA)")
    rows = [[x["prompt_len"], x["batch"], x["steps"], _f(x["baseline_tok_s"], "{:.0f}"), _f(x["new_tok_s"], "{:.0f}"),
             _f(x["new_over_baseline"], "{:.3f}"), x["greedy_identical"]] for x in d["rows"]]
    return head + "\n\n" + _table(["prompt tokens", "batch", "timed steps", "baseline tok/s", "new tok/s",
                                   "new / baseline (median of rounds)", "greedy identical"], rows)


def _md_profile(p: dict) -> str:
    parts = [f"Profile of decode steps ({p['steps']} steps per case, torch.profiler, self CPU time; parts timed "
             f"around the engine's methods over the same steps)"]
    for case in p["cases"]:
        for e in ("baseline", "new"):
            x = case[e]
            parts += ["", f"{e}, batch {case['batch']} after {case['prompt_len']} prompt tokens: {x['ms_per_step']:.1f} "
                      f"ms/step under the profiler; parts (ms/step): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in x["parts_ms_per_step"].items()), "",
                      _table(["operator", "self ms/step", "share", "calls/step"],
                             [[o["op"], _f(o["self_ms_per_step"]), _f(100 * o["share"], "{:.1f}%"),
                               _f(o["calls_per_step"], "{:.0f}")] for o in x["ops"]])]
    if "forward_ms_by_tokens" in p:
        parts += ["", "One plain forward of (1, T) tokens (new tree's model, depth 3, median of 5): "
                  + ", ".join(f"T={t}: {ms:.1f} ms" for t, ms in p["forward_ms_by_tokens"].items())]
    return "\n".join(parts)


def _md_soak(s: dict) -> str:
    return (f"Soak: {s['requests']} requests through HTTP (default model, --kv-cache-mb {s['budget_mb']:g}, concurrency "
            f"{s['concurrency']}, depths 1-4, 8-64 tokens, streamed and not) in {s['seconds']:.0f} s; statuses "
            f"{s['statuses']}; RSS loaded {s['rss_loaded_mib']:.0f} MiB, after the first {s['first']} "
            f"{s['rss_after_first_mib']:.0f}, after all {s['rss_after_all_mib']:.0f}, peak {s['rss_peak_mib']:.0f}")


SECTIONS_MD = {"admission": _md_admission, "prefix": _md_prefix, "chunked": _md_chunked, "decode": _md_decode,
               "profile": _md_profile, "soak": _md_soak}


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_v2",
                                description="Engine v2 (issue 11) against the engine of --baseline-ref, in one run.")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="where to write the results")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--baseline-ref", default=BASELINE_REF, help="the commit whose engine is the baseline (a git worktree)")
    p.add_argument("--quick", action="store_true", help="the same targets, fewer rounds and a shorter soak")
    p.add_argument("--tiny", action="store_true", help="a tiny random checkpoint and a few steps (checks the machinery)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", choices=("parent", "worker"), default="parent", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "worker":
        return worker_main(args.threads)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if bad or args.out is None or args.threads < 1:
        why = f"unknown target(s) {', '.join(bad)}" if bad else "--out is required" if args.out is None else "--threads must be >= 1"
        print(f"benchmarks.engine_v2: error: {why}", file=sys.stderr)
        return 2
    plan = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = "python -m benchmarks.engine_v2 " + " ".join(argv if argv is not None else sys.argv[1:])
    r = {"command": command, **run(plan, targets, args.baseline_ref, args.threads, args.seed)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
