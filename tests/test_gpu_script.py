"""bench/gpu.sh, the script for a lent GPU machine, in its CPU dry run: every stage at tiny size, one summary."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in
            (line.split("|") for line in summary.splitlines() if line.startswith("| ") and "| stage |" not in line)}
    assert list(rows) == ["tests", "train", "decode", "pretrain"], summary
    assert rows["tests"][0] == "ok" and "skipped" in rows["tests"][2]  # no GPU here: test_cuda.py skips
    assert rows["train"][0] == "ok" and "tok/s" in rows["train"][2]
    assert rows["decode"][0]  # a failure there is logged, not fatal
    assert rows["pretrain"][0] == "ok" and "bits/byte" in rows["pretrain"][2], summary
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"summary.md", "tests.log", "train.log", "decode.log", "pretrain.log"} <= set(files)
    assert len(files) <= 8  # the device tool brings back at most 8 files
    assert (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8") == results  # the benches record into $OUT
