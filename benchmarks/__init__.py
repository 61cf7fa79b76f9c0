"""Benchmarks of the MeSH serving stack, one file per question (issue "Benchmarks ...").

    python -m benchmarks.run --out docs/benchmarks.json          # make bench: everything, plots in docs/
    python -m benchmarks.run --quick --out bench-quick.json      # make bench-quick: reduced 1-3, < 3 min

Files: common.py (models, machine facts, timing helpers), decode.py (our engine vs Hugging Face
``generate()`` on identical weights), depth.py (cost per recursion depth, MeSH vs base, KV bytes),
mixed.py (mixed-depth batches, admission at a KV budget), serving.py (HTTP load against a real
uvicorn server, vLLM ``benchmark_serving`` style), report.py (markdown tables and plots), run.py (CLI).
Shared with the tests and scripts: harness.py (a `python -m server` subprocess on a free port),
loadgen.py (the stdlib asyncio HTTP client and load shapes), tiny.py (tiny random checkpoints).

Timings on a shared machine are noisy, so every comparison is made inside one run, with the
contenders interleaved (round-robin), and reported as medians over repeats.
"""
