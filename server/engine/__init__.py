"""The engine: a synchronous core (`Engine.add_request / abort / step`) and the thread that serves it.

Files, one job each: sampler.py (SamplingParams and the per-step token choice), sequence.py (request
state), detokenizer.py (incremental text, stop strings), block_manager.py (the paged K/V pool's
blocks, prefix hashing), scheduler.py (admission, chunked prefill, preemption), model_runner.py
(inputs -> forward -> tokens), engine.py (step = schedule -> run -> postprocess), async_engine.py
(the thread and asyncio delivery), metrics.py, loading.py (safe checkpoint loading).
"""

from .engine import DEFAULT_MODEL, Completion, Engine, EngineConfig, EngineDead, QueueFull, RequestError, load, resolve_dtype
from .sampler import SamplingParams
from .sequence import AutoDepth

__all__ = ["AutoDepth", "DEFAULT_MODEL", "Completion", "Engine", "EngineConfig", "EngineDead", "QueueFull", "RequestError",
           "SamplingParams", "load", "resolve_dtype"]
