#!/usr/bin/env bash
# The ablation study at Pythia-160M shape on GPUs: vanilla `12` vs `2+4R2+2` base / residual / anchor /
# anchor_emb / mesh (group A), vanilla `16` vs `2+4R3+2` base and mesh (group B), mesh fixed K=2 vs
# uniform K in [1,4] (depth elasticity), with the paper's diagnostics. d=768, 12 heads, seq 2048,
# AdamW (0.9, 0.95), wd 0.01, cosine to 10% with 1% warmup, bf16 autocast (training.train on CUDA).
#
#   scripts/gpu_ablation.sh                                   # every GPU nvidia-smi lists
#   TEXT=/data/pile_sample.txt TOKENS=2000000000 SEEDS=3 scripts/gpu_ablation.sh
#   NGPU=1 TOKENS=20000000 SEEDS=1 VARIANTS=vanilla,base,mesh scripts/gpu_ablation.sh   # a short look
#
# One driver process per GPU, each taking every NGPU-th run (--shard I/N); runs are resumable, so
# rerunning the script after an interruption continues where it stopped. The tables and figures come
# from a final --report-only pass: OUT/report.md, OUT/summary.json, OUT/figures/ablation_*.png.
#
# Token budget: the paper trains on the Pile for tens of billions of tokens; tinyshakespeare (the
# default TEXT, ~350k tokens) is only a smoke test at this size (it overfits after one epoch). Point
# TEXT at a large corpus and raise TOKENS for numbers comparable to the paper's Table 1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/ablation-160m}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
TOKENS=${TOKENS:-100000000}       # per run; 100M tokens = 763 steps of 64 x 2048
SEEDS=${SEEDS:-3}
VOCAB=${VOCAB:-50304}             # Pythia's vocabulary size (a BPE trained on TEXT)
BATCH=${BATCH:-64}                # sequences per optimizer step (x 2048 tokens)
MICRO=${MICRO:-16}                # sequences per forward on one GPU (gradient accumulation)
LR=${LR:-6e-4}                    # Pythia-160M's peak learning rate
VARIANTS=${VARIANTS:-}

if [ "$NGPU" -lt 1 ]; then
    echo "gpu_ablation.sh: no GPU found (nvidia-smi -L lists none); set NGPU or use 'make ablation' on a CPU" >&2
    exit 2
fi

ARGS=(--text "$TEXT" --out "$OUT" --shape pythia160m --hidden-size 768 --heads 12 --seq-len 2048
      --batch-size "$BATCH" --micro-batch-size "$MICRO" --tokens "$TOKENS" --lr "$LR" --vocab-size "$VOCAB"
      --seeds "$SEEDS" --device cuda --diag-windows 16)
[ -n "$VARIANTS" ] && ARGS+=(--variants "$VARIANTS")

# Tokenize once before the shards start (they would otherwise race to write OUT/data).
"$PYTHON" -m training.prepare --input "$TEXT" --out "$OUT/data" --vocab-size "$VOCAB" --val-fraction 0.1 --quiet

pids=()
for ((i = 0; i < NGPU; i++)); do
    CUDA_VISIBLE_DEVICES=$i "$PYTHON" -m training.experiments.ablation "${ARGS[@]}" --shard "$i/$NGPU" \
        > "$OUT/shard-$i.log" 2>&1 &
    pids+=($!)
    echo "shard $i/$NGPU on GPU $i: log $OUT/shard-$i.log"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

"$PYTHON" -m training.experiments.ablation "${ARGS[@]}" --report-only
exit $status
