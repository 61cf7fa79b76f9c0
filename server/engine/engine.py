"""The engine: model + tokenizer + KV pool + scheduler + runner, stepped in a background thread.

Ways to drive it:

    engine = Engine(EngineConfig(model="model/default"))  # or Engine(config, model=m, tokenizer=t, metrics=False)
    # synchronous, in this thread (tests, benchmarks): whole requests ...
    greedy = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, detokenize=False)
    outs = engine.generate([[1, 2, 3]] * 32, greedy, loops=2)        # -> [Completion]
    # ... or single steps: each is one prefill of newly admitted rows or one decode token for all rows
    seqs = engine.add_request([[1, 2, 3]] * 16, greedy, loops=1) + engine.add_request([[4, 5]] * 16, greedy, loops=4)
    while engine.has_work():
        engine.step()                                                  # -> [StepOutput]
    # serving: a thread runs steps; each request gets an asyncio queue of StepOutputs
    engine.start()
    handle = engine.submit([ids], params, loops=2)        # inside a running event loop
    async for out in handle: ...                           # handle.abort() frees its rows at once

`engine.pool` is the depth-aware KV pool (`bytes_per_token(K)`, `allocated_bytes()`, `tier_rows(t)`).

Requests join and leave between steps. add_request / abort only append to thread-safe queues that
the engine thread drains at the start of each step, so the asyncio side never waits on the model.
"""

from __future__ import annotations

import asyncio
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

from .detokenizer import Detokenizer
from .kv_pool import KVPool
from .loading import load_checkpoint
from .metrics import Metrics
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingParams, prompt_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, Status, StepOutput

log = logging.getLogger("server.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    max_batch_size: int = 64  # running sequences per step
    kv_cache_mb: float = 1024.0  # KV byte budget for admission
    max_waiting: int = 128  # waiting sequences before 429
    max_model_len: int | None = None  # prompt + max_tokens; default the model's max_position_embeddings
    max_num_batched_tokens: int | None = None  # padded prompt tokens per prefill step; default max(2048, max_model_len)
    served_model_name: str | None = None  # the `model` name clients use; default the directory name

    def __post_init__(self):
        for name in ("max_batch_size", "max_waiting"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint directory: safetensors only, checked, one-line errors (loading.py)."""
    return load_checkpoint(path, device, dtype)


class RequestHandle:
    """One HTTP request's sequences and the asyncio queue their outputs arrive on (in the event loop's thread)."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.unfinished = 0
        self.aborted = False
        self.deadline: float | None = None  # time.monotonic() past which iterating raises TimeoutError

    def abort(self) -> None:
        """Frees this request's rows at the next step boundary (client gone, error elsewhere)."""
        if not self.aborted and self.unfinished:
            self.aborted = True
            self.engine.abort(self.seqs)

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        if self.unfinished == 0:
            raise StopAsyncIteration
        # The per-request timeout (--request-timeout): past the deadline this raises asyncio.TimeoutError,
        # and the caller aborts the request.
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise asyncio.TimeoutError
        if not self.queue.empty():
            out = self.queue.get_nowait()
        elif self.deadline is None:
            out = await self.queue.get()
        else:
            out = await asyncio.wait_for(self.queue.get(), self.deadline - time.monotonic())
        if out.finished:
            self.unfinished -= 1
        return out


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
        self.device = resolve_device(config.device) if model is None else next(model.parameters()).device
        if model is None:
            self.dtype = resolve_dtype(config.dtype, self.device)
            path = Path(config.model) if config.model is not None else DEFAULT_MODEL
            model, tokenizer = load(path, self.device, self.dtype)
            self.model_path = path
        else:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed along with the model")
            self.dtype, self.model_path = next(model.parameters()).dtype, None
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.model_name = config.served_model_name or (self.model_path.name if self.model_path else "mesh")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        self._backend = tokenizer.backend_tokenizer

        self.pool = KVPool(cfg, int(config.kv_cache_mb * 2**20), config.max_batch_size, self.max_model_len, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, config.max_num_batched_tokens or max(2048, self.max_model_len))
        self.runner = ModelRunner(model, self.pool)
        self.metrics = Metrics(cfg.max_loops) if metrics is True else (metrics or None)
        if self.metrics is not None:
            self.metrics.bind(self)

        self._inbox: deque[Sequence] = deque()  # added by any thread, drained by the engine thread
        self._aborts: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self.num_waiting = 0  # sequences submitted and not yet admitted (the 429 bound counts these)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # why the engine thread died, if it did
        self.sampler = Sampler(self.vocab_size, self.device)

    # ---- tokens <-> text ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The Rust tokenizer itself: encode (event loop) and decode (engine thread) only read it, while the
        # transformers wrapper may reconfigure truncation, which fails ("Already borrowed") across threads.
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens dropped (the same function streams and echoes use)."""
        return self._backend.decode(ids, skip_special_tokens=True)

    # ---- requests -----------------------------------------------------------------------------
    def check_request(self, prompts: list[list[int]], params: SamplingParams, loops: int | None) -> int:
        """Validates a request against this model and budget; returns the depth. Raises RequestError."""
        cfg = self.model.config
        loops = cfg.default_loops if loops is None else loops
        try:
            cfg.check_loops(loops)
        except ValueError as e:
            raise RequestError(str(e), "loops") from None
        need = self.pool.bytes_per_token(loops)
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
            if need * total > self.pool.budget:
                raise RequestError(
                    f"{total} tokens at loops={loops} need {need * total / 2**20:.1f} MiB of KV cache, more than the "
                    f"whole budget ({self.pool.budget / 2**20:.1f} MiB, --kv-cache-mb): use fewer tokens or a smaller loops",
                    "max_tokens",
                )
        return loops

    def add_request(self, prompts: list[list[int]], params: SamplingParams, loops: int | None = None, n: int = 1,
                    request_id: str | None = None, sink=None) -> list[Sequence]:
        """Queues n sequences per prompt (choice index = prompt * n + i). Thread-safe.

        Raises RequestError (never runnable), QueueFull (retry later) or EngineDead.
        """
        if self.error is not None or self._stopping:
            raise EngineDead("the engine has stopped")
        loops = self.check_request(prompts, params, loops)
        if len(prompts) * n > self.config.max_waiting:  # could never be queued: not a "retry later"
            raise RequestError(f"{len(prompts)} prompt(s) x n={n} sequences exceed the waiting-queue bound "
                               f"{self.config.max_waiting} (--max-waiting)", "n")
        request_id = request_id or uuid.uuid4().hex
        seqs = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                detok = Detokenizer(self.decode, ids, params.stop) if params.detokenize else None
                seqs.append(Sequence(ids, params, loops, request_id=request_id, index=p * n + i,
                                     generator=params.generator(self.device, offset=i), sink=sink, detok=detok))
        with self._lock:
            if self.error is not None or self._stopping:  # checked again under the lock the dying loop takes
                raise EngineDead("the engine has stopped")
            if self.num_waiting + len(seqs) > self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.num_waiting} of {self.config.max_waiting} places taken)")
            self.num_waiting += len(seqs)
            self._inbox.extend(seqs)
        if self.metrics is not None:
            self.metrics.loops.observe(loops)
        self._wake.set()
        return seqs

    def submit(self, prompts: list[list[int]], params: SamplingParams, loops: int | None = None, n: int = 1,
               request_id: str | None = None) -> RequestHandle:
        """add_request for the asyncio side: outputs arrive on the handle's queue. Call inside the event loop."""
        handle = RequestHandle(self, asyncio.get_running_loop())
        handle.seqs = self.add_request(prompts, params, loops, n, request_id, sink=handle)
        handle.unfinished = len(handle.seqs)
        return handle

    def abort(self, seqs: list[Sequence]) -> None:
        """Ends these sequences at the next step boundary, freeing their rows. Thread-safe."""
        self._aborts.extend(seqs)
        self._wake.set()

    # ---- one step -----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

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

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.WAITING:
            with self._lock:
                self.num_waiting -= 1
        self.scheduler.finish(seq, reason)
        if self.metrics is not None and reason in ("stop", "length"):
            self.metrics.e2e.observe(time.perf_counter() - seq.arrival)

    @torch.inference_mode()  # pool buffers are inference tensors: every change to them happens in this mode
    def step(self) -> list[StepOutput]:
        """Admits, then runs one prefill or decode step; returns what each touched sequence got."""
        outputs = self._drain()
        batch = self.scheduler.schedule()
        if batch is None:
            return outputs
        kind, seqs = batch
        try:
            if kind == "prefill":
                with self._lock:
                    self.num_waiting -= len(seqs)
                if self.metrics is not None:
                    for s in seqs:
                        self.metrics.queue_time.observe(s.admitted_at - s.arrival)
                logits, prompt_logits = self.runner.prefill(seqs)
                for s in seqs:
                    s.num_cached = len(s.prompt_ids)
                if prompt_logits is not None:
                    self._prompt_logprobs(seqs, prompt_logits)
            else:
                logits = self.runner.decode(seqs)
                for s in seqs:
                    s.num_cached += 1
            seqs, logits, failed = self._drop_non_finite(seqs, logits)
            outputs += failed
            if seqs:
                outputs += self._sample_and_emit(seqs, logits)
        except Exception as e:  # fail this step's sequences, keep serving the others
            log.exception("engine step failed (%s of %d sequences)", kind, len(seqs))
            for s in seqs:
                if s.status is not Status.FINISHED:
                    self._finish(s, "error")
                    outputs.append(StepOutput(s, [], "", None, "error", error=f"{type(e).__name__}: {e}"))
        return outputs

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

    @torch.inference_mode()
    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        outputs = []
        try:
            tokens, lp_rows = self.sampler(seqs, logits)
        except Exception:  # a fault in one row's sampling must not fail its neighbours: each row alone
            log.exception("sampling failed for a batch of %d sequences: retrying each alone", len(seqs))
            tokens, lp_rows, keep = [], {}, []
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
            seqs = keep  # (the others' seeded draws of this one step may differ from a fault-free run)
        now = time.perf_counter()
        m = self.metrics
        per_loops: dict[int, int] = {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            try:
                seq.output_ids.append(tok)
                if m is not None:
                    (m.ttft.observe(now - seq.arrival) if len(seq.output_ids) == 1 else m.itl.observe(now - seq.last_token_at))
                    per_loops[seq.loops] = per_loops.get(seq.loops, 0) + 1
                if len(seq.output_ids) == 1:
                    seq.first_token_at = now
                seq.last_token_at = now
                p = seq.params
                reason = None
                stop_ok = len(seq.output_ids) >= p.min_tokens
                if tok == self.eos_token_id and not p.ignore_eos and stop_ok:
                    reason = "stop"
                elif seq.detok is not None and seq.detok.add(tok) and stop_ok:
                    reason = "stop"  # a stop string
                if reason is None and len(seq.output_ids) >= p.max_tokens:
                    reason = "length"
                text = seq.detok.delta(final=reason is not None) if seq.detok is not None else ""
                if reason is not None:
                    self._finish(seq, reason)
                outputs.append(StepOutput(seq, [tok], text, lp_rows.get(i), reason))
            except Exception as e:  # e.g. this row's detokenizer: only this row fails
                if seq.status is not Status.FINISHED:
                    outputs.append(self._fail(seq, e))
        if m is not None:
            for k, c in per_loops.items():
                m.count_generated(k, c)
        return outputs

    def _fail(self, seq: Sequence, e: Exception) -> StepOutput:
        """Ends one sequence with finish_reason "error" (its request gets a 5xx or an error event)."""
        log.error("request %s (choice %d) failed: %s: %s", seq.request_id, seq.index, type(e).__name__, e, exc_info=e)
        self._finish(seq, "error")
        return StepOutput(seq, [], "", None, "error", error=f"{type(e).__name__}: {e}")

    def _prompt_logprobs(self, seqs: list[Sequence], prompt_logits: list) -> None:
        for seq, logits in zip(seqs, prompt_logits):
            if logits is not None:
                seq.prompt_logprobs = prompt_logprobs(seq.prompt_ids, logits, seq.params.logprobs or 0)

    # ---- synchronous use ----------------------------------------------------------------------
    def generate(self, prompts: list[list[int] | str], params: SamplingParams | None = None, loops: int | None = None,
                 n: int = 1) -> list[Completion]:
        """Runs prompts to completion in this thread (the engine thread must not be running)."""
        if self._thread is not None:
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

    # ---- the background thread ----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mesh-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread; sequences still queued or running end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._deliver(self.step())
            self._deliver(self._abort_all())
        except BaseException as e:  # the loop itself broke: report, fail everyone, let /health say 503
            with self._lock:  # add_request checks `error` under the lock: nothing joins after the sweep below
                self.error = e
            log.exception("engine thread died")
            self._deliver(self._abort_all(reason="error", error=f"engine stopped: {type(e).__name__}: {e}"))

    @torch.inference_mode()
    def _abort_all(self, reason: str = "abort", error: str | None = None) -> list[StepOutput]:
        """Ends every queued and running sequence. Each gets its last output even when the bookkeeping
        fails, since this also runs after the loop itself broke (a request must never wait forever)."""
        with self._lock:
            seqs = list(self._inbox)
            self._inbox.clear()
        self._aborts.clear()
        seqs += list(self.scheduler.waiting) + list(self.pool.rows)
        outputs = []
        for seq in seqs:
            if seq.status is Status.FINISHED:
                continue
            try:
                self._finish(seq, reason)
            except Exception:
                log.exception("could not free sequence %s cleanly", seq)
                seq.status, seq.finish_reason = Status.FINISHED, reason
            outputs.append(StepOutput(seq, [], "", None, reason, error=error))
        return outputs

    @staticmethod
    def _deliver(outputs: list[StepOutput]) -> None:
        """Hands outputs to their requests' event loops: one thread-safe call per loop per step."""
        by_loop: dict = {}
        for out in outputs:
            if out.seq.sink is not None:
                by_loop.setdefault(out.seq.sink.loop, []).append(out)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
                pass


def _put_all(items: list[StepOutput]) -> None:
    for out in items:
        out.seq.sink.queue.put_nowait(out)
