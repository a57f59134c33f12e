#!/usr/bin/env bash
# Every GPU measurement of the project in one command, for a CUDA machine without network (~8 minutes on one H200;
# the steps' time limits add up to 590 s):
#
#   1. bench_train.py   -- the contrastive training loop vs plain PyTorch vs TRL's DPOTrainer, bf16 autocast, on the
#                          CPU benchmark's shape (4.9M parameters) and on a 1024 x 12 model (~150M parameters);
#   2. fedlada run      -- the real-model path end to end: a ~0.5B-parameter Qwen2-style LLM loaded from a local
#                          directory (random weights: no download), bfloat16, LoRA, on the GPU, with three tiny SLMs
#                          pretrained on the GPU; 2 rounds on a small built-in benchmark; run directory kept;
#   3. bench_scoring.py -- per-example loop vs batched vs batched with question-prefix reuse, tiny shapes and 1024x12;
#   4. gpu_check.py     -- generation, scoring and LoRA training throughput and MFU of the 0.47B model, with
#                          torch.profiler tables of each phase.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]            # default benchmarks/results/gpu; needs trl (benchmarks/requirements.txt)
#   DEVICE=cpu QUICK=1 benchmarks/gpu_suite.sh /tmp/suite   # a minutes-long dry run of the same steps on a CPU
#   STEPS="train-small run" RUN_ARGS="--set rounds=1" benchmarks/gpu_suite.sh   # some steps only; extra run options
#
# Each step runs under its own time limit and the suite goes on when one fails; the log says each step's exit status.
# What comes out: suite.log, train_small.json, train_large.json, scoring.json, gpu_check.json, gpu_check_profile.txt
# and run.tar.gz (the run directory without its checkpoints).
set -u
OUT_DIR=${1:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEPS=${STEPS:-train-small train-large run scoring gpu-check}
RUN_ARGS=${RUN_ARGS:-}
# the step limits fit the GPU machine's time budget; a CPU dry run (QUICK=1) on a shared machine gets 4x as long
LIMIT_SCALE=${LIMIT_SCALE:-$([ "$QUICK" = 1 ] && echo 4 || echo 1)}
PY=${PYTHON:-python3}
if [[ "$DEVICE" == cuda* ]] && ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: DEVICE=$DEVICE but $PY's torch sees no CUDA GPU; on a CPU use DEVICE=cpu QUICK=1 for a dry run" >&2
    exit 2
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d -t fedlada-gpu-suite-XXXXXX)
LOG=$OUT_DIR/suite.log
: >"$LOG"

want() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log its output and exit status
    local name=$1 limit=$(($2 * LIMIT_SCALE)) start rc
    shift 2
    want "$name" || want "${name#save-}" || return 0
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$LOG"
}

{ date -u; uname -a; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv; $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"; } >>"$LOG" 2>&1

if [ "$QUICK" = 1 ]; then
    TRAIN_SMALL=(--examples 32 --reps 1 --hidden 64 --layers 2 --heads 4)
    TRAIN_LARGE=(--examples 32 --reps 1 --hidden 96 --layers 2 --heads 4)
    SCORING=(--questions 4 --reps 1 --shapes 64x2x4,96x2x4)
    CHECK=(--tiny)
    LLM_DTYPE=float32
    SIZES='train_per_client = 40
test_per_client = 12
public_size = 40
general_size = 300
eval_limit = 10
holdout_size = 8'
    PRETRAIN=3000
    CANDIDATES=12
else
    TRAIN_SMALL=(--examples 512 --reps 3)
    TRAIN_LARGE=(--examples 512 --reps 3 --hidden 1024 --layers 12 --heads 16)
    SCORING=(--reps 5 --shapes 256x6x4,256x4x8,96x3x4,128x2x4,64x4x4,1024x12x16)
    CHECK=()
    LLM_DTYPE=bfloat16
    SIZES='train_per_client = 300
test_per_client = 100
public_size = 300
general_size = 3000
eval_limit = 40
holdout_size = 32'
    PRETRAIN=150000
    CANDIDATES=48
fi
VARIANTS=${VARIANTS:-ours,ours_reuse,plain,trl_precompute,trl_refmodel}
BF16=(--bf16)
[ "$DEVICE" = cpu ] && BF16=()

step train-small 90 $PY benchmarks/bench_train.py --device "$DEVICE" "${BF16[@]}" --variants $VARIANTS \
    --out "$OUT_DIR/train_small.json" "${TRAIN_SMALL[@]}"
step train-large 110 $PY benchmarks/bench_train.py --device "$DEVICE" "${BF16[@]}" --variants $VARIANTS \
    --out "$OUT_DIR/train_large.json" "${TRAIN_LARGE[@]}"

# the real-model path: save a random Qwen2-style model, then `fedlada run` loads it like any local model
step save-run 50 env -u OUT $PY benchmarks/gpu_check.py "${CHECK[@]}" --device "$DEVICE" \
    --save-model "$WORK/llm" --save-only
cat >"$WORK/run.toml" <<EOF
rounds = 2
seed = 0

[data]
num_clients = 3
$SIZES

[models]
cache_dir = "$WORK/cache"

[models.llm]
source = "$WORK/llm"
dtype = "$LLM_DTYPE"
device = "$DEVICE"
lora = true
lora_r = 16
lora_alpha = 32

[[models.slms]]
hidden_size = 96
num_layers = 3
num_heads = 4
device = "$DEVICE"
pretrain_tokens = $PRETRAIN

[[models.slms]]
hidden_size = 128
num_layers = 2
num_heads = 4
device = "$DEVICE"
pretrain_tokens = $PRETRAIN

[[models.slms]]
hidden_size = 64
num_layers = 4
num_heads = 4
device = "$DEVICE"
pretrain_tokens = $PRETRAIN

[lada]
candidates_per_round = $CANDIDATES

[train]
bf16 = $([ "$DEVICE" = cpu ] && echo false || echo true)
EOF
want run && cp "$WORK/run.toml" "$OUT_DIR/run.toml"
# shellcheck disable=SC2086  # RUN_ARGS holds several options
step run 190 $PY -m fedlada.cli run --config "$WORK/run.toml" --out "$WORK/run" $RUN_ARGS
want run && tar -czf "$OUT_DIR/run.tar.gz" -C "$WORK" --exclude=run/checkpoints run 2>>"$LOG"

step scoring 60 $PY benchmarks/bench_scoring.py --device "$DEVICE" --out "$OUT_DIR/scoring.json" "${SCORING[@]}"
step gpu-check 90 env -u OUT $PY benchmarks/gpu_check.py "${CHECK[@]}" --device "$DEVICE" --profile \
    --out "$OUT_DIR/gpu_check.json"

rm -rf "$WORK"
echo "=== done; outputs in $OUT_DIR" | tee -a "$LOG"
