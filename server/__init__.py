"""OpenAI-compatible serving for MeSH models, with per-request recursion depth (`loops`).

    from server import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model="model/default"))
    engine.generate(["To be"], SamplingParams(temperature=0, max_tokens=32), loops=2)

    python -m server --help        # the HTTP server (server.api.app.create_app + uvicorn)

server/engine/ is the engine (no HTTP, no asyncio in its core), server/api/ the HTTP layer,
__main__.py the CLI. Each package's docstring lists its files.
"""

__all__ = ["Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name):
    # Imported on first use, so `python -m server --help` answers without loading torch.
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
