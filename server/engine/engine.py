"""The engine core: requests in, one step at a time, outputs out. Synchronous: no threads, no asyncio.

    engine = Engine(EngineConfig(model="model/default"))   # or Engine(config, model=m, tokenizer=t, metrics=False)
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, detokenize=False)
    outs = engine.generate([[1, 2, 3]] * 32, greedy, loops=2)           # whole requests -> [Completion]
    seqs = engine.add_request([[1, 2, 3]] * 16, greedy, loops=1)        # or step by step:
    while engine.has_work():
        engine.step()                                                   # -> [StepOutput]

    step = schedule (which rows, how many tokens) -> run (the model) -> postprocess (sample, finish)

K/V memory is one block pool (kv_cache.py, block_manager.py) sized at start: `--kv-cache-mb` is a hard
cap. The HTTP side drives the engine through async_engine.AsyncEngine (a thread that steps it and
delivers outputs to asyncio); `Engine.start / submit / stop / alive` delegate to that wrapper.
add_request and abort may be called from any thread: they only append to queues that `step` drains.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import DEFAULT_MODEL, MeshForCausalLM
from model.device import resolve_device

from .async_engine import AsyncEngine
from .block_manager import BlockManager
from .compiled import MODES as COMPILE_MODES, CompiledDecoder, resolve_mode as resolve_compile
from .detokenizer import Detokenizer
from .kv_cache import PagedKVCache
from .loading import load_checkpoint
from .metrics import Metrics
from .model_runner import ModelRunner, RunOutput
from .sampler import Sampler, SamplingParams, distribution, exponential_race, token_logprobs
from .scheduler import Scheduler
from .sequence import EXIT_CRITERIA, AutoDepth, Sequence, Status, StepOutput

log = logging.getLogger("server.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_MB = 256.0  # the CPU default: 16k tokens of the default model at depth 3


class RequestError(ValueError):
    """A request the engine can never run (bad prompt, depth, length); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: retry later (HTTP 429)."""


class EngineDead(RuntimeError):
    """The engine thread has stopped (HTTP 503)."""


@dataclass
class EngineConfig:
    model: str | Path | None = None  # a directory with config.json, weights and tokenizer.json; None = embedded default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # the K/V pool's: auto (the weights' dtype) | float32 | bfloat16 | float16
    max_batch_size: int = 64  # running sequences per step
    kv_cache_mb: float | None = None  # the K/V pool; None: 256 MiB on CPU, from gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device memory the process may fill (model + pool)
    block_size: int = 16  # tokens per K/V block
    max_waiting: int = 128  # waiting sequences before 429
    max_model_len: int | None = None  # prompt + max_tokens; default the model's max_position_embeddings
    max_num_batched_tokens: int = 256  # tokens one step carries: decode rows plus prompt chunks
    enable_prefix_caching: bool = True
    speculative_loops: int = 0  # d > 0: greedy rows deeper than d draft at depth d and verify at their own
    num_speculative_tokens: int = 3  # g: drafts per speculation round
    speculative_max_batch: int = 1  # greedy and unseeded rows start rounds only while at most this many rows run
    served_model_name: str | None = None  # the `model` name clients use; default the directory name
    compile: str = "auto"  # torch.compile'd decode graphs (compiled.py): auto | on | off

    def __post_init__(self):
        for name in ("max_batch_size", "max_waiting", "block_size", "max_num_batched_tokens", "speculative_max_batch"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len!r}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}): every running row needs one token a step")
        if isinstance(self.speculative_loops, bool) or not isinstance(self.speculative_loops, int) or self.speculative_loops < 0:
            raise ValueError(f"speculative_loops must be an integer >= 0 (0 = off), got {self.speculative_loops!r}")
        if isinstance(self.num_speculative_tokens, bool) or not isinstance(self.num_speculative_tokens, int) \
                or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) not in ("auto", *DTYPES):
                raise ValueError(f"{name} must be auto, {', '.join(DTYPES)}; got {getattr(self, name)!r}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint directory: safetensors only, checked, one-line errors (loading.py)."""
    return load_checkpoint(path, device, dtype)


def kv_pool_bytes(config: EngineConfig, device: torch.device) -> int:
    """The pool's size: --kv-cache-mb when given; else on CUDA what --gpu-memory-utilization leaves after
    the weights (free memory minus the share kept back), on CPU 256 MiB."""
    if config.kv_cache_mb is not None:
        return int(config.kv_cache_mb * 2**20)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(free - (1 - config.gpu_memory_utilization) * total))
    return int(CPU_KV_CACHE_MB * 2**20)


@dataclass
class Completion:
    """What `Engine.generate` returns per sequence."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    loops: int
    logprobs: list | None = field(default=None, repr=False)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, model: MeshForCausalLM | None = None, tokenizer=None,
                 metrics: Metrics | None | bool = True):
        """Loads `config.model` unless `model` and `tokenizer` are given. ``metrics=False``: no Prometheus hooks."""
        self.config = config = config or EngineConfig()
        self._load(config, model, tokenizer)
        cfg = self.model.config
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
        unit = PagedKVCache.unit_bytes(cfg, config.block_size, self.kv_dtype)
        num_units = kv_pool_bytes(config, self.device) // unit
        if num_units < cfg.num_layer_applications(cfg.max_loops):
            raise ValueError(f"the K/V pool ({num_units * unit / 2**20:.2f} MiB) cannot hold one block of "
                             f"{config.block_size} tokens at loops={cfg.max_loops}: raise --kv-cache-mb")
        self.kv = PagedKVCache(cfg, num_units, config.block_size, self.kv_dtype, self.device, compute_dtype=self.dtype)
        self.blocks = BlockManager(cfg, num_units, config.block_size, self.max_model_len,
                                   enable_prefix_caching=config.enable_prefix_caching, clear=self.kv.clear)
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_batch_size)
        if config.speculative_loops >= cfg.max_loops:
            raise ValueError(f"speculative_loops {config.speculative_loops} must be below the model's max_loops "
                             f"{cfg.max_loops}: drafts run shallower than the rows they serve")
        self.runner = ModelRunner(self.model, self.kv, config.speculative_loops, self._compiled(config),
                                  config.num_speculative_tokens)
        self.sampler = Sampler(self.vocab_size, self.device, self.eos_token_id)
        self.metrics = Metrics(cfg.max_loops) if metrics is True else (metrics or None)
        self.scheduler.on_admit, self.scheduler.on_preempt = self._on_admit, self._on_preempt
        if config.speculative_loops:
            self.scheduler.plan = self._plan_round
        if self.metrics is not None:
            self.metrics.bind(self)

        self._inbox: deque[Sequence] = deque()  # added by any thread, drained by step()
        self._aborts: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self.num_waiting = 0  # sequences submitted and never admitted yet (the 429 bound counts these)
        self.closed = False  # set by the async wrapper when it stops or dies: add_request refuses
        self.frontend = AsyncEngine(self)  # the thread and the asyncio side

    def _load(self, config: EngineConfig, model, tokenizer) -> None:
        self.device = resolve_device(config.device) if model is None else next(model.parameters()).device
        if model is None:
            self.dtype = resolve_dtype(config.dtype, self.device)
            self.model_path = Path(config.model) if config.model is not None else DEFAULT_MODEL
            model, tokenizer = load(self.model_path, self.device, self.dtype)
        else:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed along with the model")
            self.dtype, self.model_path = next(model.parameters()).dtype, None
        self.model, self.tokenizer = model.eval(), tokenizer
        model.recurrence.fuse_routers()  # inference only: one router Linear and softmax per iteration
        cfg = model.config
        self.model_name = config.served_model_name or (self.model_path.name if self.model_path else "mesh")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        self._backend = tokenizer.backend_tokenizer

    def _compiled(self, config: EngineConfig) -> CompiledDecoder | None:
        """--compile: decode graphs, the default depth's batch-1 graph compiled now (the rest when first needed)."""
        on, max_batch = resolve_compile(config.compile, self.device)
        if not on:
            return None
        compiled = CompiledDecoder(self.model, self.kv, self.blocks.max_blocks, min(max_batch, config.max_batch_size),
                                   background=self.device.type == "cpu")
        compiled.warm_up(self.model.config.default_loops)
        return compiled

    def describe_pool(self) -> str:
        """One line for the startup log: pool size and how many sequences of each depth fit at full context."""
        cfg, bs = self.model.config, self.config.block_size
        per_seq = -(-self.max_model_len // bs)
        fits = ", ".join(f"{self.blocks.num_units // (per_seq * self.blocks.units_per_block(k))} at loops={k}"
                         for k in range(1, cfg.max_loops + 1))
        return (f"K/V pool: {self.kv.nbytes / 2**20:.1f} MiB, {self.blocks.num_units} units of {bs} tokens "
                f"(a block of {bs} tokens at depth K takes P + K*C + D = {cfg.n_prelude} + K*{cfg.n_core} + "
                f"{cfg.n_coda} units); sequences of {self.max_model_len} tokens that fit: {fits}; prefix caching "
                f"{'on' if self.config.enable_prefix_caching else 'off'}")

    # ---- tokens <-> text ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The Rust tokenizer itself: encode (event loop) and decode (engine thread) only read it, while the
        # transformers wrapper may reconfigure truncation, which fails ("Already borrowed") across threads.
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens dropped (the same function streams and echoes use)."""
        return self._backend.decode(ids, skip_special_tokens=True)

    # ---- requests -----------------------------------------------------------------------------
    def check_depth(self, loops) -> int:
        """The depth whose tiers a request holds: `loops`, the model's default, or an AutoDepth's max."""
        cfg = self.model.config
        if isinstance(loops, AutoDepth):
            a = loops if loops.max_loops is not None else dataclasses.replace(loops, max_loops=cfg.max_loops)
            for name in ("min_loops", "max_loops"):
                v = getattr(a, name)
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= cfg.max_loops:
                    raise RequestError(f"{name} must be an integer in [1, {cfg.max_loops}] for this model, got {v!r}", name)
            if a.min_loops > a.max_loops:
                raise RequestError(f"min_loops ({a.min_loops}) must not exceed max_loops ({a.max_loops})", "min_loops")
            if a.exit_criterion not in EXIT_CRITERIA:
                raise RequestError(f"exit_criterion must be one of {', '.join(EXIT_CRITERIA)}, got {a.exit_criterion!r}", "exit_criterion")
            if not a.threshold >= 0:
                raise RequestError(f"exit_threshold must be >= 0, got {a.exit_threshold!r}", "exit_threshold")
            return a.max_loops
        loops = cfg.default_loops if loops is None else loops
        try:
            return cfg.check_loops(loops)
        except ValueError as e:
            raise RequestError(str(e), "loops") from None

    def check_request(self, prompts: list[list[int]], params: SamplingParams, loops) -> int:
        """Validates a request against this model and pool; returns the depth. Raises RequestError."""
        loops = self.check_depth(loops)
        for ids in prompts:
            if not ids:
                raise RequestError("the prompt is empty: give at least one token", "prompt")
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", "prompt")
            if len(ids) > self.max_model_len:
                raise RequestError(f"the prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len}", "prompt")
            total = len(ids) + params.max_tokens
            if total > self.max_model_len:
                raise RequestError(
                    f"this model's maximum context length is {self.max_model_len} tokens, but {total} were requested "
                    f"({len(ids)} in the prompt, {params.max_tokens} in max_tokens): reduce the prompt or max_tokens",
                    "max_tokens",
                )
            if not self.blocks.can_ever_fit(total, loops):
                raise RequestError(
                    f"{total} tokens at loops={loops} need more K/V blocks than the whole pool holds "
                    f"({self.kv.nbytes / 2**20:.1f} MiB, --kv-cache-mb): use fewer tokens or a smaller loops",
                    "max_tokens",
                )
        return loops

    def add_request(self, prompts: list[list[int]], params: SamplingParams, loops: int | None = None, n: int = 1,
                    request_id: str | None = None, sink=None) -> list[Sequence]:
        """Queues n sequences per prompt (choice index = prompt * n + i). Thread-safe.

        Raises RequestError (never runnable), QueueFull (retry later) or EngineDead.
        """
        if self.closed:
            raise EngineDead("the engine has stopped")
        auto = loops if isinstance(loops, AutoDepth) else None
        loops = self.check_request(prompts, params, loops)
        if auto is not None and auto.max_loops is None:
            auto = dataclasses.replace(auto, max_loops=loops)
        if len(prompts) * n > self.config.max_waiting:  # could never be queued: not a "retry later"
            raise RequestError(f"{len(prompts)} prompt(s) x n={n} sequences exceed the waiting-queue bound "
                               f"{self.config.max_waiting} (--max-waiting)", "n")
        request_id = request_id or uuid.uuid4().hex
        seqs = []
        for p, ids in enumerate(prompts):
            leader = None
            for i in range(n):
                detok = Detokenizer(self.decode, ids, params.stop, min_tokens=params.min_tokens) if params.detokenize else None
                seq = Sequence(ids, params, loops, request_id=request_id, index=p * n + i, sink=sink, detok=detok,
                               generator=params.generator(self.device, offset=i), leader=leader, auto=auto)
                leader = leader or seq
                seqs.append(seq)
        with self._lock:
            if self.closed:  # checked again under the lock the dying loop takes
                raise EngineDead("the engine has stopped")
            if self.num_waiting + len(seqs) > self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.num_waiting} of {self.config.max_waiting} places taken)")
            self.num_waiting += len(seqs)
            self._inbox.extend(seqs)
        if self.metrics is not None and auto is None:
            self.metrics.loops.observe(loops)
        self.frontend.wake()
        return seqs

    def abort(self, seqs: list[Sequence]) -> None:
        """Ends these sequences at the next step boundary, freeing their blocks. Thread-safe."""
        self._aborts.extend(seqs)
        self.frontend.wake()

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    # ---- one step: schedule -> run -> postprocess -------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = self._drain()
        rows = self.scheduler.schedule()
        for seq, e in self.scheduler.take_failed():  # allocation faults: the pool is consistent, the row ends
            outputs.append(self._fail(seq, e))
        if rows:
            result = self._run(rows, outputs)
            outputs += self._postprocess(result)
        return outputs

    def _run(self, rows: list[tuple[Sequence, int]], outputs: list[StepOutput]) -> RunOutput:
        """The model over the step's rows; when it raises, each row again alone, failing only those that
        still raise. Advances each successful row's computed tokens and offers its full blocks to the cache."""
        try:
            result, ran = self.runner.run(rows), rows
        except Exception:
            log.exception("model step failed (%d rows): retrying each row alone", len(rows))
            parts, ran = [], []
            for row in rows:
                try:
                    parts.append(self.runner.run([row]))
                    ran.append(row)
                except Exception as e:
                    outputs.append(self._fail(row[0], e))
            result = RunOutput.merge(parts)
        for seq, n in ran:
            if not seq.spec_tokens:  # drafts and verify passes advance in _postprocess, by what is accepted
                seq.num_computed += n
                self.blocks.commit(seq)
        return result

    def _postprocess(self, result: RunOutput) -> list[StepOutput]:
        for seq, (start, logits) in result.prompt_logits.items():
            self._prompt_logprobs(seq, start, logits)
        outputs: list[StepOutput] = []
        for seq, logits in result.verify.items():
            outputs += self._verify(seq, logits)
        if not result.seqs:
            return outputs
        seqs, logits, failed = self._drop_non_finite(result.seqs, result.logits)
        outputs += failed
        drafts = [i for i, s in enumerate(seqs) if s.spec_tokens]
        if drafts:
            self._record_drafts([seqs[i] for i in drafts], logits[drafts])
            keep = [i for i in range(len(seqs)) if not seqs[i].spec_tokens]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
        if seqs:
            outputs += self._sample_and_emit(seqs, logits)
        return outputs

    # ---- self-speculation: draft at depth d, verify at depth K ------------------------------------
    def _plan_round(self, seq: Sequence) -> None:
        """Starts a speculation round for a decoding row deeper than the draft depth. For a seeded sampled
        row, whether it drafts depends only on its own request, never on the batch."""
        d, left = self.config.speculative_loops, seq.params.max_tokens - len(seq.output_ids)
        # penalized sampled rows decode plainly: their penalties would have to see the drafts
        if seq.spec_tokens or seq.auto or seq.loops <= d or left < 2 or (not seq.params.greedy and seq.params.penalized):
            return
        # Above the crossover (docs/SPECULATION.md: 2 rows on this CPU) drafting costs more than it saves. Only
        # rows whose text cannot depend on it stop: greedy ones and unseeded sampled ones; a seeded row keeps
        # drafting whatever the batch, so its random draws (and its text) stay batch-invariant.
        busy = len(self.scheduler.running) > self.config.speculative_max_batch
        if busy and (seq.params.greedy or seq.params.seed is None):
            return
        seq.spec_tokens = min(self.config.num_speculative_tokens, left)

    def _record_drafts(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """A draft token per row: the depth-d argmax for greedy rows (verify decides); for sampled rows a
        draw from the depth-d distribution q, kept for the accept/reject rule."""
        for seq, row, tok in zip(seqs, logits, logits.argmax(dim=-1).tolist()):
            if not seq.params.greedy:
                q = distribution(seq, row[None], seq.output_ids + seq.draft_ids, self.vocab_size, self.eos_token_id)
                tok = int(exponential_race(q, [seq.generator])[0])
                seq.draft_probs.append(q[0])
            seq.draft_ids.append(tok)
            seq.loop_steps += self.config.speculative_loops

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[StepOutput]:
        """Accepts the longest prefix of drafts that depth-K decoding would have produced: position i's
        depth-K choice (greedy rows: the sampler, with the history so far; sampled rows: the accept/reject
        rule) is emitted; a choice that differs from draft i is the correction and ends the round. Stops
        and max_tokens cut where plain decoding would."""
        g, d = seq.spec_tokens, self.config.speculative_loops
        seq.loop_steps += (seq.loops - d) * g
        seq.num_drafted += g
        outputs, accepted, now = [], 0, time.perf_counter()
        plain = seq.params.greedy and seq.params.logprobs is None and not seq.params.penalized and \
            not seq.params.logit_bias and len(seq.output_ids) >= seq.params.min_tokens
        choices = logits.argmax(dim=-1).tolist() if plain else None  # greedy with nothing to adjust: one argmax
        for i in range(g):
            if plain:
                tok, lp = choices[i], {}
            elif not seq.params.greedy:
                tok, lp = self._accept_or_resample(seq, i, logits[i : i + 1])
            else:  # the sampler, position by position: penalties and min_tokens see the tokens before
                (tok,), lp = self.sampler([seq], logits[i : i + 1])
            seq.num_computed += 1  # input i is a real token (the last one emitted): its K/V are final
            out = self._emit(seq, tok, lp.get(0), now)
            outputs.append(out)
            if tok != seq.draft_ids[i] or out.finished:
                break
            accepted += 1
        seq.num_accepted += accepted
        seq.num_spec_emitted += len(outputs)
        if self.metrics is not None:
            self.metrics.count_speculation(g, accepted)
            self.metrics.count_generated(seq.loops, len(outputs))
            self.metrics.observe_token_loops(d + (seq.loops - d) * g / len(outputs), len(outputs))
        if seq.status is not Status.FINISHED:
            seq.end_round()
            self.blocks.commit(seq)
            self.blocks.trim(seq, seq.num_computed + 1)  # blocks of rejected positions go back
        return outputs

    def _accept_or_resample(self, seq: Sequence, i: int, logits: torch.Tensor) -> tuple[int, dict]:
        """Speculative sampling (Leviathan et al., Chen et al.): keep draft y ~ q with probability
        min(1, p(y) / q(y)), else draw from max(0, p - q) renormalised; the result is distributed exactly
        as p, the depth-K distribution (temperature, filters, logit_bias and min_tokens included). The
        row's own generator gives every random number, so a seeded row stays batch-invariant."""
        p = distribution(seq, logits, seq.output_ids, self.vocab_size, self.eos_token_id)[0]
        q, y = seq.draft_probs[i], seq.draft_ids[i]
        u = float(torch.rand((), generator=seq.generator, device=seq.generator.device))
        if u * float(q[y]) <= float(p[y]):
            tok = y
        else:
            residual = (p - q).clamp_(min=0)
            residual = residual if float(residual.sum()) > 0 else p
            tok = int(exponential_race((residual / residual.sum())[None], [seq.generator])[0])
        lp = {}
        if seq.params.logprobs is not None:
            k = seq.params.logprobs
            chosen, top_ids, top_lp = token_logprobs(logits, torch.tensor([tok], device=logits.device), k)
            lp = {0: [(chosen.item(), list(zip(top_ids[0].tolist(), top_lp[0].tolist())))]}
        return tok, lp

    def _drain(self) -> list[StepOutput]:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        outputs = []
        while self._aborts:
            seq = self._aborts.popleft()
            if seq.status is not Status.FINISHED:
                self._finish(seq, "abort")
                outputs.append(StepOutput(seq, [], "", None, "abort"))
        return outputs

    def _on_admit(self, seq: Sequence, queried: int, hit: int) -> None:
        with self._lock:
            self.num_waiting -= 1
        if self.metrics is not None:
            self.metrics.queue_time.observe(seq.admitted_at - seq.arrival)
            self.metrics.prefix_queries.inc(queried)
            self.metrics.prefix_hits.inc(hit)

    def _on_preempt(self, seq: Sequence) -> None:
        log.debug("preempted %s (request %s): out of K/V blocks", seq, seq.request_id)
        if self.metrics is not None:
            self.metrics.preemptions.inc()

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.WAITING and seq.admitted_at == 0.0:
            with self._lock:
                self.num_waiting -= 1
        self.scheduler.finish(seq, reason)
        if self.metrics is not None and reason in ("stop", "length"):
            self.metrics.e2e.observe(time.perf_counter() - seq.arrival)

    def _fail(self, seq: Sequence, e: Exception) -> StepOutput:
        """Ends one sequence with finish_reason "error" (its request gets a 5xx or an error event)."""
        log.error("request %s (choice %d) failed: %s: %s", seq.request_id, seq.index, type(e).__name__, e, exc_info=e)
        if seq.status is not Status.FINISHED:
            self._finish(seq, "error")
        elif seq.admitted_at == 0.0:  # failed by the scheduler before its first admission
            with self._lock:
                self.num_waiting -= 1
        return StepOutput(seq, [], "", None, "error", error=f"{type(e).__name__}: {e}")

    def _drop_non_finite(self, seqs: list[Sequence], logits: torch.Tensor):
        """Rows whose logits are not finite (NaN/inf, from their own input) fail alone: returns the other
        rows, their logits and the failed rows' outputs. Rows never mix (attention and the recurrence are
        per row), so the others are sound."""
        finite = torch.isfinite(logits).all(dim=-1)  # (B,)
        if bool(finite.all()):
            return seqs, logits, []
        ok = finite.tolist()
        outputs = []
        for seq, good in zip(seqs, ok):
            if not good:
                log.error("non-finite logits for request %s (choice %d): failing it", seq.request_id, seq.index)
                self._finish(seq, "error")
                outputs.append(StepOutput(seq, [], "", None, "error", error="the model produced non-finite logits"))
        return [s for s, good in zip(seqs, ok) if good], logits[finite], outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, outputs: list[StepOutput]):
        """(rows kept, their tokens, their logprobs): a fault in one row's sampling fails that row alone."""
        try:
            tokens, lp_rows = self.sampler(seqs, logits)
            return seqs, tokens, lp_rows
        except Exception:
            log.exception("sampling failed for a batch of %d sequences: retrying each alone", len(seqs))
        keep, tokens, lp_rows = [], [], {}
        for i, seq in enumerate(seqs):
            try:
                (tok,), lp = self.sampler([seq], logits[i : i + 1])
            except Exception as e:
                outputs.append(self._fail(seq, e))
                continue
            if lp:
                lp_rows[len(keep)] = lp[0]
            keep.append(seq)
            tokens.append(tok)
        return keep, tokens, lp_rows  # (the others' seeded draws of this one step may differ from a fault-free run)

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        seqs, tokens, lp_rows = self._sample(seqs, logits, outputs)
        now = time.perf_counter()
        per_loops: dict[int, int] = {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            try:
                outputs.append(self._emit(seq, tok, lp_rows.get(i), now))
                spent = seq.loops if seq.auto is None else seq.last_exit  # auto: where this token stopped
                seq.loop_steps += spent
                label = "auto" if seq.auto else seq.loops
                per_loops[(label, spent)] = per_loops.get((label, spent), 0) + 1
            except Exception as e:  # e.g. this row's detokenizer: only this row fails
                if seq.status is not Status.FINISHED:
                    outputs.append(self._fail(seq, e))
        if self.metrics is not None:
            for (label, spent), c in per_loops.items():
                self.metrics.count_generated(label, c)
                self.metrics.observe_token_loops(spent, c)
        return outputs

    def _emit(self, seq: Sequence, tok: int, logprobs, now: float) -> StepOutput:
        """Appends one sampled token, decides whether the sequence is done, returns its output."""
        seq.append(tok)
        m = self.metrics
        if m is not None:
            m.ttft.observe(now - seq.arrival) if len(seq.output_ids) == 1 else m.itl.observe(now - seq.last_token_at)
        if len(seq.output_ids) == 1:
            seq.first_token_at = now
        seq.last_token_at = now
        p = seq.params
        reason = None
        can_stop = len(seq.output_ids) >= p.min_tokens
        if tok == self.eos_token_id and not p.ignore_eos and can_stop:
            reason = "stop"
        elif seq.detok is not None and seq.detok.add(tok) and can_stop:
            reason = "stop"  # a stop string
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        text = seq.detok.delta(final=reason is not None) if seq.detok is not None else ""
        if reason is not None:
            self._finish(seq, reason)
        return StepOutput(seq, [tok], text, logprobs, reason)

    def _prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens start+1 .. from a chunk's logits (row i predicts token start+i+1)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # the first prompt token has no context
        end = min(start + logits.shape[0], len(seq.prompt_ids) - 1)  # predictions of prompt tokens only
        if end <= start:
            return
        ids = torch.tensor(seq.prompt_ids[start + 1 : end + 1], device=logits.device)
        chosen, top_ids, top_lp = token_logprobs(logits[: end - start], ids, seq.params.logprobs or 0)
        seq.prompt_logprobs += [(c, list(zip(ti, tl))) for c, ti, tl in zip(chosen.tolist(), top_ids.tolist(), top_lp.tolist())]

    # ---- synchronous use ----------------------------------------------------------------------
    def generate(self, prompts: list[list[int] | str], params: SamplingParams | None = None, loops: int | None = None,
                 n: int = 1) -> list[Completion]:
        """Runs prompts to completion in this thread (the engine thread must not be running)."""
        if self.frontend.running:
            raise RuntimeError("generate() steps the engine itself; it cannot run while the engine thread does (use submit)")
        params = params or SamplingParams()
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        seqs = self.add_request(ids, params, loops, n)
        logprobs: dict[int, list] = {s.id: [] for s in seqs}
        texts: dict[int, list[str]] = {s.id: [] for s in seqs}
        pending = {s.id for s in seqs}
        while pending:
            for out in self.step():
                if out.seq.id in pending:
                    texts[out.seq.id].append(out.text)
                    if out.logprobs:
                        logprobs[out.seq.id] += out.logprobs
                    if out.finished:
                        pending.discard(out.seq.id)
        return [Completion(s.prompt_ids, s.output_ids, "".join(texts[s.id]), s.finish_reason, s.loops,
                           logprobs[s.id] if params.logprobs is not None else None) for s in seqs]

    # ---- the serving thread (async_engine.AsyncEngine) ------------------------------------------
    def start(self) -> None:
        self.frontend.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.frontend.stop(timeout)

    def submit(self, prompts: list[list[int]], params: SamplingParams, loops: int | None = None, n: int = 1,
               request_id: str | None = None):
        return self.frontend.submit(prompts, params, loops, n, request_id)

    @property
    def alive(self) -> bool:
        return self.frontend.alive

    @property
    def error(self) -> BaseException | None:
        return self.frontend.error

    def all_sequences(self) -> list[Sequence]:
        """Every sequence not finished: queued, waiting or running (for shutdown)."""
        with self._lock:
            inbox = list(self._inbox)
            self._inbox.clear()
        self._aborts.clear()
        return inbox + list(self.scheduler.waiting) + list(self.scheduler.running)
