"""What every benchmark needs: the model under test, engines holding a fixed batch, timing helpers,
and a description of the machine the numbers came from.

The subject is the embedded default model (model/default) when it exists. Until then it is a
random model with the same configuration (training/configs/shakespeare-default.toml): timings do not
depend on the values of the weights, only on their shapes.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import DEFAULT_MODEL
from model import MeshConfig, MeshForCausalLM

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOML = ROOT / "training" / "configs" / "shakespeare-default.toml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# --tiny: a model small enough for the smoke test (shapes only; every code path is the real one).
TINY = dict(layout="1+1R4+1", scheme="mesh", max_loops=4, hidden_size=32, num_attention_heads=4,
            intermediate_size=64, vocab_size=320, max_position_embeddings=512)

# Text the stand-in tokenizer learns from when tinyshakespeare is not at hand (and prompts come from).
LINES = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "First Citizen: You are all resolved rather to die than to famish?",
    "All: Resolved. resolved.",
    "First Citizen: First, you know Caius Marcius is chief enemy to the people.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]


@dataclass
class Subject:
    """The model the depth, mixed-depth and serving benchmarks run, and where it came from."""

    model: MeshForCausalLM
    tokenizer: object
    source: str  # "model/default" or a description of the stand-in
    directory: Path | None  # a checkpoint directory the HTTP server can load, when one exists

    @property
    def config(self) -> MeshConfig:
        return self.model.config


# ---- models ---------------------------------------------------------------------------------
def default_model_exists() -> bool:
    return (DEFAULT_MODEL / "model.safetensors").is_file() and (DEFAULT_MODEL / "tokenizer.json").is_file()


def default_config(tiny: bool = False) -> MeshConfig:
    """The default model's configuration: from model/default when trained, else from its training TOML."""
    if tiny:
        kw = dict(TINY)
        return MeshConfig.from_layout(kw.pop("layout"), eos_token_id=None, bos_token_id=None, **kw)
    if default_model_exists():
        return MeshConfig.from_pretrained(str(DEFAULT_MODEL))
    from training.config import load_config
    from training.config import model_config

    cfg = load_config(DEFAULT_TOML)
    return model_config(cfg, {"vocab_size": cfg["data"].get("vocab_size", 4096), "eos_token_id": 0, "bos_token_id": 0,
                              "pad_token_id": 1})


def random_model(config: MeshConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> MeshForCausalLM:
    torch.manual_seed(seed)
    return MeshForCausalLM(config).to(device=device, dtype=dtype).eval()


def stand_in_tokenizer(vocab_size: int, text: Path | None = SHAKESPEARE):
    """A byte-level BPE like the default model's (training.prepare), learnt from tinyshakespeare when it
    is at hand (so its vocabulary covers the model's), else from a few built-in lines."""
    from training.prepare import train_tokenizer

    if text is not None and Path(text).is_file():
        pieces = Path(text).read_text(encoding="utf-8").splitlines(keepends=True)
    else:
        pieces = [line + "\n" for line in LINES * 20]
    return train_tokenizer(pieces, vocab_size=vocab_size, show_progress=False)


def load_subject(tiny: bool = False, device="cpu", dtype=torch.float32, seed: int = 0) -> Subject:
    if not tiny and default_model_exists():
        from server.engine import load

        model, tok = load(DEFAULT_MODEL, torch.device(device), dtype)
        return Subject(model, tok, "model/default (trained)", DEFAULT_MODEL)
    config = default_config(tiny)
    tok = stand_in_tokenizer(config.vocab_size, None if tiny else SHAKESPEARE)
    what = "tiny random model" if tiny else "random weights, model/default's configuration (not trained yet)"
    return Subject(random_model(config, seed, device, dtype), tok, what, None)


def save_subject(subject: Subject, path: Path) -> Path:
    """A checkpoint directory of the subject (for the HTTP server), written only for a stand-in."""
    if subject.directory is not None:
        return subject.directory
    path.mkdir(parents=True, exist_ok=True)
    subject.model.save_pretrained(str(path))
    subject.tokenizer.save_pretrained(str(path))
    return path


def prompt_ids(tokenizer, n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of exactly `length` tokens: windows of encoded text at random offsets, so that the
    tokens are ones a user would send (random ids pad the rare case of too little text)."""
    text = " ".join(LINES * 8)
    ids = [t for t in tokenizer(text)["input_ids"] if t < vocab_size]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if len(ids) >= length:
            start = rng.randrange(len(ids) - length + 1)
            out.append(ids[start : start + length])
        else:
            out.append(ids + [rng.randrange(2, vocab_size) for _ in range(length - len(ids))])
    return out


# ---- engines --------------------------------------------------------------------------------
def make_engine(model: MeshForCausalLM, tokenizer, max_batch_size: int = 64, max_model_len: int | None = None,
                seq_len: int | None = None, **config):
    """The server's engine (scheduler + paged K/V pool + model runner) around an in-memory model, without
    HTTP or Prometheus. The pool holds `max_batch_size` sequences of `seq_len` tokens (default: the
    context) at the deepest depth, so a timed run never preempts. `config`: other EngineConfig fields
    (compile, kv_cache_dtype, ...)."""
    from server import Engine, EngineConfig
    from server.engine.kv_cache import PagedKVCache

    c, bs = model.config, 16
    tokens = seq_len or max_model_len or c.max_position_embeddings
    units = max_batch_size * -(-tokens // bs) * c.num_layer_applications(c.max_loops) + c.num_layer_applications(c.max_loops)
    mb = units * PagedKVCache.unit_bytes(c, bs, model.dtype) / 2**20
    cfg = EngineConfig(max_batch_size=max_batch_size, kv_cache_mb=mb, max_waiting=4096, max_model_len=max_model_len,
                       block_size=bs, max_num_batched_tokens=max(256, max_batch_size), **config)
    return Engine(cfg, model=model, tokenizer=tokenizer, metrics=False)


def greedy(max_tokens: int):
    """Greedy decoding of exactly max_tokens tokens, no detokenizing (what HF generate() returns: ids)."""
    from server import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)


class FixedBatch:
    """An engine whose running batch is `depths` (one row each, any order) after a 32-token prompt, for
    timing single decode steps: `step()` runs one scheduler step (every row gets one token)."""

    def __init__(self, subject: Subject, depths: list[int], prompt_len: int, steps: int, seed: int = 0):
        self.rows = len(depths)
        # Prompts are prefilled in chunks over several steps, and rows done early decode meanwhile: up to
        # `lead` tokens ahead of the last row when the timed steps begin.
        lead = -(-self.rows * prompt_len // max(256, self.rows)) + 1
        need = prompt_len + steps + 2 + lead
        self.engine = make_engine(subject.model, subject.tokenizer, max_batch_size=self.rows, seq_len=need)
        prompts = prompt_ids(subject.tokenizer, self.rows, prompt_len, subject.config.vocab_size, seed)
        if need > self.engine.max_model_len:
            raise ValueError(f"{steps} decode steps after a {prompt_len}-token prompt exceed the model's "
                             f"context of {self.engine.max_model_len} tokens")
        params = greedy(steps + 2 + lead)  # the prefill token + lead + steps + 1: rows stay in the pool after the last timed step
        self.seqs = []
        for k in sorted(set(depths), reverse=True):
            group = [p for p, d in zip(prompts, depths) if d == k]
            self.seqs += self.engine.add_request(group, params, loops=k)
        while any(not s.output_ids for s in self.seqs):
            self.engine.step()  # prefill (every row is admitted: the pool holds them all)

    def step(self) -> None:
        outs = self.engine.step()
        if len(outs) != self.rows:
            raise RuntimeError(f"a timed step gave {len(outs)} tokens for {self.rows} rows (a row finished early)")


def interleave(benches: dict, rounds: int, steps: int, device=None, progress=None) -> dict[str, list[float]]:
    """Round-robin timing: each round times a block of `steps` consecutive calls of every bench, so load
    changes on a shared machine hit every contender alike. Returns name -> one value per round: the
    block's mean seconds per call. Block means, not single calls: on an oversubscribed machine a single
    call of a few ms is either preempted or not, and the median of such a two-valued distribution jumps;
    a block's mean takes the preemption in proportion to the work, and the median over rounds drops
    the rounds a burst of load hit."""
    times = {name: [] for name in benches}
    for r in range(rounds):
        names = list(benches) if r % 2 == 0 else list(reversed(benches))  # ABBA: no contender always first
        for name in names:
            fn = benches[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
        if progress is not None:
            progress.update(1)
    return times


# ---- numbers --------------------------------------------------------------------------------
def sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    return float(statistics.median(xs))


def percentile(xs, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summary(xs) -> dict:
    """mean / median / p99 of a list (NaN when empty)."""
    if not xs:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": float(statistics.fmean(xs)), "median": median(xs), "p99": percentile(xs, 99)}


def linear_fit(xs, ys) -> dict:
    """Least squares y = a + b x and its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"a": a, "b": b, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


# ---- the machine ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(device) -> dict:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1_5_15": load_average(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
