#!/usr/bin/env bash
# Seed 003's path on your own corpus, one plain `miniglm` command per stage:
# raw novels -> documents -> tokenizer -> token shards -> pretrained MiniGLM -> SFT -> eval -> report.
#
#   bash examples/novels.sh CORPUS_DIR SFT_FILE OUT_DIR
#
# CORPUS_DIR: novels as .txt (any Chinese encoding), HTML or .jsonl; SFT_FILE: chat records
# (alpaca, sharegpt, messages, question/answer; see README). 5% of SFT_FILE is held out for eval.
# FAST=1: a handful of steps and a small vocab, to check the path end to end in about a minute.
# SFT_STEPS=N: SFT steps at full size (default 100). On a CPU busy with other jobs, OMP_NUM_THREADS=1
# can train several times faster than two torch threads fighting for the cores.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: [FAST=1] bash $0 CORPUS_DIR SFT_FILE OUT_DIR" >&2
    exit 2
fi
CORPUS=$1 SFT=$2 OUT=$3
CONFIGS=$(dirname "$0")/../configs
mkdir -p "$OUT"

if [ "${FAST:-0}" = 1 ]; then
    VOCAB=512
    PRETRAIN=(--set max_steps=3 --set batch_size=2 --set warmup_steps=1 --set eval_batches=1)
    SFT_TRAIN=(--set max_steps=2 --set batch_size=2 --set warmup_steps=1 --set eval_batches=1)
    EVAL=(--limit 4 --max-new-tokens 16 --embedder none)
else
    VOCAB=8192
    # configs/demo-sft.toml's 300 SFT steps would take about half an hour on 2 CPU cores: 100 here
    PRETRAIN=() SFT_TRAIN=(--set max_steps="${SFT_STEPS:-100}") EVAL=()
fi

: > "$OUT/stages.tsv"
stage() {  # stage NAME OUTPUT COMMAND...: run COMMAND, then say where it wrote and how long it took
    local name=$1 out=$2 t0=$EPOCHREALTIME
    shift 2
    echo "== $name: $*"
    "$@"
    local secs
    secs=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")
    echo "== $name: ${secs}s -> $out"
    printf '%s\t%s\t%s\n' "$name" "$secs" "$out" >> "$OUT/stages.tsv"
}

stage corpus "$OUT/corpus" \
    miniglm corpus prepare "$CORPUS" --out "$OUT/corpus"
stage tokenizer "$OUT/tokenizer" \
    miniglm tokenizer train --corpus "$OUT/corpus" --vocab-size $VOCAB --out "$OUT/tokenizer"
stage tokenize "$OUT/data" \
    miniglm corpus tokenize --corpus "$OUT/corpus" --tokenizer "$OUT/tokenizer" --out "$OUT/data"
stage pretrain "$OUT/pretrain" \
    miniglm train --config "$CONFIGS"/novels-small.toml --set data="$OUT/data" --set out_dir="$OUT/pretrain" \
    --set model.vocab_size=$VOCAB "${PRETRAIN[@]}"
stage sft-prepare "$OUT/sft_data, $OUT/sft_test.jsonl" \
    miniglm sft prepare --data "$SFT" --tokenizer "$OUT/tokenizer" --max-len 256 --out "$OUT/sft_data" \
    --test-out "$OUT/sft_test.jsonl" --test-fraction 0.05
stage sft "$OUT/sft" \
    miniglm train --config "$CONFIGS"/demo-sft.toml --set data="$OUT/sft_data" --set init_from="$OUT/pretrain" \
    --set out_dir="$OUT/sft" --set lr=1e-3 --set min_lr=1e-4 "${SFT_TRAIN[@]}"
stage eval "$OUT/sft/eval" \
    miniglm eval --run "$OUT/sft" --data "$OUT/sft_test.jsonl" "${EVAL[@]}"
stage report "$OUT/sft/eval/report.html" \
    miniglm report "$OUT/sft"

echo
echo "stage        seconds  output"
awk -F'\t' '{ printf "%-12s %7s  %s\n", $1, $2, $3 }' "$OUT/stages.tsv"
