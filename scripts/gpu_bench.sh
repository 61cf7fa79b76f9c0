#!/usr/bin/env bash
# Benchmarks on one CUDA GPU, in at most ~6 minutes (issue "Benchmarks", part 5):
#   1. the decode table (our engine vs Hugging Face generate(), identical weights, batch 1 and 32,
#      256 new tokens, float32 on both sides), cost per depth and mixed-depth batching, on CUDA;
#   2. training throughput and MFU of mesh-160m (2+4R2+2, d=768, seq 2048, bf16 autocast,
#      torch.compile) for a few optimizer steps (target: MFU >= 35% on an H100).
#
#   scripts/gpu_bench.sh                       # results in runs/gpu-bench/
#   OUT=/tmp/gb STEPS=40 MICRO=16 scripts/gpu_bench.sh
#
# MFU is training.train's own figure: (6 N_applied + 12 L_applied d T) FLOPs per token x tokens/s
# over the GPU's peak bf16 dense FLOPs (989e12 for H100/H200 SXM), averaged over each log window;
# the summary takes the median of the windows after the first (which holds the compile).
# Any text does for a throughput run: TEXT defaults to tinyshakespeare, or to the repository's own
# sources when that file is not on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# The repo's environment (make setup) when present, else the machine's python3, which needs a CUDA build
# of torch and the project's dependencies (pip install -e ".[dev]").
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-runs/gpu-bench}
TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
STEPS=${STEPS:-30}        # optimizer steps of the MFU run
MICRO=${MICRO:-16}        # sequences of 2048 tokens per forward
BATCH=${BATCH:-$MICRO}    # sequences per optimizer step (BATCH / MICRO accumulation steps)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: no CUDA GPU visible to torch; run 'make bench' for the CPU tables" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. Decode / depth / mixed tables on CUDA (the serving sweep stays a CPU-side measurement).
timeout 180 "$PYTHON" -m benchmarks.run --device cuda --sections decode,depth,mixed --quiet \
    --out "$OUT/bench_cuda.json" --plots "$OUT" | tee "$OUT/bench_cuda.md"

# 2. mesh-160m training throughput and MFU.
if [ ! -f "$TEXT" ]; then
    TEXT="$OUT/corpus.txt"
    for _ in 1 2 3 4; do cat $(git ls-files '*.py' '*.md' '*.toml') ; done > "$TEXT"
fi
timeout 60 "$PYTHON" -m training.prepare --input "$TEXT" --out "$OUT/data" --vocab-size 8192 --quiet
rm -rf "$OUT/train-160m"
timeout 210 "$PYTHON" -m training.train --config training/configs/mesh-160m.toml --data "$OUT/data" \
    --out "$OUT/train-160m" --quiet \
    --set train.max_steps="$STEPS" --set train.batch_size="$BATCH" --set train.micro_batch_size="$MICRO" \
    --set train.warmup_steps=2 --set train.log_interval=5 --set train.eval_interval=0 --set train.eval_windows=2 \
    --set train.checkpoint_interval=0 --set train.keep_checkpoints=1

"$PYTHON" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
recs = [json.loads(l) for l in (out / "train-160m" / "metrics.jsonl").read_text().splitlines()]
recs = [r for r in recs if "mfu" in r]
steady = recs[1:] or recs
summary = {"mfu_median": statistics.median(r["mfu"] for r in steady),
           "tok_per_s_median": statistics.median(r["tok_per_s"] for r in steady),
           "windows": [{"step": r["step"], "mfu": r["mfu"], "tok_per_s": r["tok_per_s"]} for r in recs]}
(out / "train_160m_mfu.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"mesh-160m: MFU {100 * summary['mfu_median']:.1f}% (median of {len(steady)} windows), "
      f"{summary['tok_per_s_median']:,.0f} tokens/s; target >= 35%")
EOF
