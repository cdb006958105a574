#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 15, in one run on a lent GPU machine (about 6 minutes):
#   tests     tests/test_cuda.py: bf16 autocast, torch.compile, DDP over NCCL and `miniglm train` under torchrun
#   train     bench/train.py --device cuda (MFU of GPT-2 small against the bf16 peak)
#   decode    bench/decode.py --device cuda (a failure is logged, and the other stages go on)
#   pretrain  a novels-small-like pretraining (configs/novels-small.toml) on a generated world, capped at
#             $PRETRAIN_SECONDS of training: tokens/s and val bits/byte
#
# With the device tool, from the repository root (the machine is bare and offline: the stages run from
# source with PYTHONPATH and generate their data; everything they import is in its image, so nothing is
# carried; the summary names any that is missing there), then read summary.md among the files that come back:
#   run(command="bash bench/gpu.sh", timeout_s=480)
#   run(command="bash bench/gpu.sh decode pretrain", timeout_s=300)     # some stages only
#
#   bash bench/gpu.sh [--dry-run] [STAGE ...]          (default: every stage, in the order above)
#
# Writes $OUT (default /tmp/miniglm-gpu) summary.md: one table (stage, status, seconds, result) under the
# machine's GPU and versions; a log per stage; results.md: the benches' records, to append to bench/RESULTS.md.
# DRY_RUN=1 or --dry-run: every stage at tiny size on the CPU, in under a minute (tests/test_gpu_script.py).
# Environment: PYTHON (default python3), OUT, PRETRAIN_SECONDS (140), PRETRAIN_STEPS (20000),
# PRETRAIN_COMPILE (true), TRAIN_ARGS, DECODE_ARGS.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=${DRY_RUN:-0}
STAGES=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        tests|train|decode|pretrain) STAGES+=("$arg") ;;
        *) echo "usage: bash bench/gpu.sh [--dry-run] [tests|train|decode|pretrain ...]" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests train decode pretrain)
OUT=${OUT:-/tmp/miniglm-gpu}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT/summary.md" "$OUT/results.md"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MINIGLM_BENCH_RESULTS=$OUT/results.md
cd "$ROOT" || exit 1

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    LIMIT_TESTS=60 LIMIT_TRAIN=30 LIMIT_DECODE=30 LIMIT_DATA=30
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-30}
    WORLD=(--characters 20 --bios 2) VOCAB=300
    PRETRAIN_SETS=(max_steps=4 eval_every=2 eval_batches=1 batch_size=2 model.n_layer=1 model.n_head=2
                   model.n_embd=32 model.block_size=32 compile=false)
    DECODE_ARGS=${DECODE_ARGS:---device cpu --new 8 --no-cache-tokens 4 --threads 1}
else
    DEVICE=cuda
    LIMIT_TESTS=100 LIMIT_TRAIN=60 LIMIT_DECODE=50 LIMIT_DATA=45
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-140}
    WORLD=(--characters 4000 --bios 8) VOCAB=8192
    PRETRAIN_SETS=("max_steps=${PRETRAIN_STEPS:-20000}" eval_every=1000 eval_batches=20 "compile=${PRETRAIN_COMPILE:-true}")
    DECODE_ARGS=${DECODE_ARGS:---device cuda --new 256 --no-cache-tokens 64}
fi
# eager only: compiling every contestant at 13.8M and 124M would take minutes
TRAIN_ARGS=${TRAIN_ARGS:---device $DEVICE --sizes 13.8M --modes eager --steps 10 --rounds 2}

ROWS=$WORK/rows  # stage <TAB> status <TAB> seconds <TAB> result, one line per stage

# run_stage NAME LIMIT CMD...: run CMD under a time limit (then STOP_SIGNAL, default TERM) into $OUT/NAME.log;
# sets STATUS and SECONDS_TAKEN
run_stage() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee -a "$OUT/$name.log"
    timeout -s "${STOP_SIGNAL:-TERM}" -k 15 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    SECONDS_TAKEN=$((SECONDS - t0))
    case $rc in
        0) STATUS=ok ;;
        124|137) STATUS="timed out (${limit} s)" ;;
        *) STATUS="failed (exit $rc)" ;;
    esac
    echo "== $name: $STATUS in ${SECONDS_TAKEN}s" | tee -a "$OUT/$name.log"
}

row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; }

stage_tests() {
    run_stage tests "$LIMIT_TESTS" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs
    row tests "$STATUS" "$SECONDS_TAKEN" "$(grep -E '(passed|failed|skipped|error)' "$OUT/tests.log" | tail -1)"
}

stage_train() {
    if [ "$DRY" = 1 ]; then  # the demo size only, 2 steps, one round
        run_stage train "$LIMIT_TRAIN" "$PY" bench/train.py --device cpu --sizes demo --modes eager --steps 2 --rounds 1
    else
        # shellcheck disable=SC2086
        run_stage train "$LIMIT_TRAIN" "$PY" bench/train.py $TRAIN_ARGS
    fi
    local best
    best=$(grep -E '^\| (124M|demo) \| miniglm' "$OUT/train.log" | head -2 | awk -F'|' '{printf "%s %s: %s tok/s, %s; ", $2, $3, $7, $(NF-1)}')
    row train "$STATUS" "$SECONDS_TAKEN" "${best:-see train.log}"
}

stage_decode() {
    # shellcheck disable=SC2086
    run_stage decode "$LIMIT_DECODE" "$PY" bench/decode.py $DECODE_ARGS
    local rows
    rows=$(grep -E '^\| (demo|15M)' "$OUT/decode.log" | awk -F'|' '{printf "%s: engine b=1 %s tok/s; ", $2, $4}')
    if [ "$STATUS" != ok ]; then
        rows="$(grep -E 'Error|error:' "$OUT/decode.log" | tail -1 | cut -c1-160)"
    fi
    row decode "$STATUS" "$SECONDS_TAKEN" "${rows:-see decode.log}"
}

stage_pretrain() {
    local data=$WORK/pretrain m=("$PY" -m miniglm.cli)
    run_stage pretrain "$LIMIT_DATA" bash -c "set -e
        ${m[*]} world --out $data/world ${WORLD[*]}
        ${m[*]} corpus prepare $data/world/corpus.jsonl --out $data/corpus --split file
        ${m[*]} tokenizer train --corpus $data/corpus --vocab-size $VOCAB --out $data/tokenizer
        ${m[*]} corpus tokenize --corpus $data/corpus --tokenizer $data/tokenizer --out $data/data"
    local data_status=$STATUS data_seconds=$SECONDS_TAKEN
    if [ "$data_status" != ok ]; then
        row pretrain "data: $data_status" "$data_seconds" "see pretrain.log"
        return
    fi
    local sets=() s
    for s in "data=$data/data" "out_dir=$data/run" "device=$DEVICE" "model.vocab_size=$VOCAB" \
             "save_every=1000000" "${PRETRAIN_SETS[@]}"; do
        sets+=(--set "$s")
    done
    # SIGINT at the cap: miniglm train stops after the step under way (its metrics.jsonl stays)
    STOP_SIGNAL=INT run_stage pretrain "$PRETRAIN_SECONDS" "${m[@]}" train --config configs/novels-small.toml "${sets[@]}"
    local status=$STATUS
    [[ $STATUS == timed* ]] && status="ok (stopped at the ${PRETRAIN_SECONDS} s cap)"
    row pretrain "$status" "$((data_seconds + SECONDS_TAKEN))" "$("$PY" - "$data/run/metrics.jsonl" <<'EOF'
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    sys.exit(print("no metrics.jsonl"))
steps = [r for r in rows if "tok_per_s" in r]
evals = [r for r in rows if "val_bpb" in r]
if not steps:
    sys.exit(print("no step logged"))
a, b = steps[len(steps) // 3], steps[-1]  # past the first third: compilation and warm-up left out
tokens = b["tok_per_s"] * b["time"] - a["tok_per_s"] * a["time"]
steady = tokens / (b["time"] - a["time"]) if b["time"] > a["time"] else b["tok_per_s"]
bpb = f"val {evals[-1]['val_bpb']:.3f} bits/byte at step {evals[-1]['step']}" if evals else "no eval yet"
print(f"{b['step']} steps in {b['time']:.0f} s: {steady:,.0f} tok/s after the first third "
      f"({b['tok_per_s']:,.0f} overall); {bpb}; train loss {b['loss']:.3f}")
EOF
)"
}

{
    echo "# bench/gpu.sh $( [ "$DRY" = 1 ] && echo "(dry run, CPU)")"
    echo
    date -u +"%Y-%m-%d %H:%M UTC"
    "$PY" -c "import platform, torch; print(f'Python {platform.python_version()}, torch {torch.__version__}, ' + (torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'))" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "
import importlib.util
need = ['numpy', 'safetensors', 'tokenizers', 'transformers', 'tqdm', 'pytest', 'hypothesis']
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print('missing packages (carry them as wheels, see the device README): ' + ', '.join(missing))"
    echo
} >"$WORK/head"
for stage in "${STAGES[@]}"; do
    "stage_$stage"
done
{
    cat "$WORK/head"
    echo "| stage | status | seconds | result |"
    echo "|---|---|---|---|"
    awk -F'\t' '{gsub(/\|/, "/", $4); printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
