#!/usr/bin/env bash
# Every GPU check in one call of at most 8 minutes (step limits sum to 465 s), results under $OUT:
#   1. correctness on CUDA: the serving engine against MeshForCausalLM.generate() in a busy
#      mixed-depth batch, greedy and seeded sampling, on the default model in bfloat16;
#   2. the decode / cost-per-depth / mixed-depth tables on CUDA (benchmarks.run --quick);
#   3. mesh-160m (2+4R2+2, d=768, seq 2048) training throughput and MFU, bf16 + torch.compile;
#   4. decode speed (benchmarks/decode_speed.py): the compiled / CUDA-graph engine against HF generate()
#      in bf16 at batch 1, 8, 32 (the twin, identical tokens), the default model at loops 1-4 against
#      twins of N(K) layers, and one stream + concurrency 32 through HTTP with --compile off / on;
#      tables in $OUT/decode_speed_cuda.md (copy to docs/gpu/).
#
#   OUT=/tmp/gc scripts/gpu_check.sh           # PYTHON=python3 where there is no .venv
#   ONLY="decode" scripts/gpu_check.sh         # a subset of: engine bench train decode
#
# Wheels under .whl/ (e.g. transformers==5.24.*, which the GPU image may lack) are installed to
# /tmp/site first. Each step has its own time limit and a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

ONLY=${ONLY:-engine decode bench train}
want() { [[ " $ONLY " == *" $1 "* ]]; }
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${SECONDS}s-${t0}s" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.log"
}

# 1. correctness (and a first speed figure) on CUDA
want engine && step engine_bf16 75 "$PY" scripts/engine_check.py --model model/default --device cuda --dtype bfloat16 \
    --batch 1 32 --new-tokens 64 --out "$OUT/engine_default_bf16.json"

# 4 (run second: the numbers the decode-speed issue asks for). Compiling graphs takes most of it.
want decode && step decode_speed_cuda 180 "$PY" -m benchmarks.decode_speed --device cuda --quick \
    --parts inproc,depths,http --out "$OUT/decode_speed_cuda.json"

# 2. decode vs HF, cost per depth, mixed-depth batching on CUDA
want bench && step bench_cuda 90 "$PY" -m benchmarks.run --quick --device cuda --sections decode,depth,mixed --quiet \
    --out "$OUT/bench_cuda.json"

# 3. mesh-160m training MFU (any text will do for throughput: the repository's own sources)
if want train; then
CORPUS="$OUT/corpus.txt"
for _ in 1 2 3 4 5 6; do find model server training benchmarks tests -name '*.py' -exec cat {} +; done > "$CORPUS"
step prepare 20 "$PY" -m training.prepare --input "$CORPUS" --out /tmp/gc-data --vocab-size 8192 --quiet
step train_160m 100 "$PY" -m training.train --config training/configs/mesh-160m.toml --data /tmp/gc-data \
    --out /tmp/gc-train --quiet --set train.max_steps=14 --set train.batch_size=16 --set train.micro_batch_size=16 \
    --set train.warmup_steps=2 --set train.log_interval=2 --set train.eval_interval=0 --set train.eval_windows=2 \
    --set train.checkpoint_interval=0
cp /tmp/gc-train/metrics.jsonl "$OUT/train_160m_metrics.jsonl" 2>/dev/null
rm -f "$CORPUS"
fi
echo "done: $(ls "$OUT")"
