"""OpenAI-compatible serving for MeSH models, with per-request recursion depth (`loops`).

    from server import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model="model/default"))
    engine.generate(["To be"], SamplingParams(temperature=0, max_tokens=32), loops=2)

    python -m server --help        # the HTTP server (server.app.create_app + uvicorn)

Files, one job each: sampling.py (token choice), sequence.py (request state), detokenizer.py
(incremental text, stop strings), kv_pool.py (depth-aware KV memory + the model's cache hook),
scheduler.py (admission, continuous batching), model_runner.py (inputs -> forward -> logits),
engine.py (the loop, threads, asyncio queues), metrics.py, protocol.py + app.py (HTTP), __main__.py (CLI).
"""

__all__ = ["Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name):
    # Imported on first use, so `python -m server --help` answers without loading torch.
    if name in ("Engine", "EngineConfig"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'server' has no attribute {name!r}")
