"""examples/novels.sh end to end, FAST=1 (a handful of steps), on the shared novels and SFT set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


def test_novels_script_fast(tmp_path):
    novels, sft = DATA / "novels", DATA / "sft" / "oaast_sft_zh.json"
    if not novels.is_dir() or not sft.exists():
        pytest.skip(f"{novels} or {sft} is absent")
    bin_dir = str(Path(sys.executable).parent)  # the venv's `miniglm`, running this checkout's code
    if shutil.which("miniglm", path=bin_dir) is None:
        pytest.skip("no `miniglm` command beside this Python (pip install -e .)")
    env = {**os.environ, "FAST": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread: tiny steps on a shared machine
    out = tmp_path / "novels"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "novels.sh"), str(novels), str(sft), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for path in ["corpus/train.jsonl", "tokenizer/tokenizer.json", "data/train.bin", "pretrain/metrics.jsonl",
                 "pretrain/best", "sft_data/train.jsonl", "sft_test.jsonl", "sft/best", "sft/eval/predictions.jsonl",
                 "sft/eval/report.html"]:
        assert (out / path).exists(), path
    metrics = json.loads((out / "sft" / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 4 and {"rouge-l", "bleu-4"} <= set(metrics["all"])
    stages = [line.split("\t")[0] for line in (out / "stages.tsv").read_text().splitlines()]
    assert stages == ["corpus", "tokenizer", "tokenize", "pretrain", "sft-prepare", "sft", "eval", "report"]
    assert "seconds" in proc.stdout
