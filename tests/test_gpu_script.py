"""bench/gpu.sh, the script for a lent GPU machine, in its CPU dry run: every stage at tiny size, one summary."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_sh(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]], str]:
    """Run bench/gpu.sh; its summary's table as {stage: [status, seconds, result]} and the whole summary."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    summary = (tmp_path / "out" / "summary.md").read_text() if (tmp_path / "out" / "summary.md").exists() else ""
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in
            (line.split("|") for line in summary.splitlines() if line.startswith("| ") and "| stage |" not in line)}
    return proc, rows, summary


def test_gpu_script_dry_run(tmp_path):
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    proc, rows, summary = gpu_sh(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    e2e = ["demo", "generate", "chat", "serve", "eval", "export hf", "export gguf", "finetune", "train torchrun"]
    assert list(rows) == ["suite", "train", "decode", "pretrain", *[f"e2e {s}" for s in e2e]], summary
    # the dry suite: two files, one all skips on a CPU; each skip listed under the table
    assert rows["suite"][0] == "ok" and "passed" in rows["suite"][2] and "skipped" in rows["suite"][2], summary
    assert "## suite: skipped tests" in summary and "tests/test_cuda.py:" in summary and "needs a CUDA GPU" in summary
    assert rows["train"][0] == "ok" and "tok/s" in rows["train"][2]
    assert rows["decode"][0]  # a failure there is logged, not fatal
    assert rows["pretrain"][0] == "ok" and "bits/byte" in rows["pretrain"][2], summary
    assert all(rows[f"e2e {s}"][0] == "ok" for s in e2e), summary
    assert "held-out characters (10 questions): exact match" in rows["e2e demo"][2]
    assert "demo done in" in rows["e2e demo"][2]
    assert "streamed" in rows["e2e serve"][2] and "exact_match" in rows["e2e eval"][2]
    assert 'device = "cpu"' in rows["e2e train torchrun"][2] and "step 4/4" in rows["e2e train torchrun"][2]
    assert "wheels: " in summary and "nanoGPT: " in summary  # what the checkout brought, said either way
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"summary.md", "suite.log", "train.log", "decode.log", "pretrain.log", "e2e.log"} <= set(files)
    assert len(files) <= 8  # the device tool brings back at most 8 files
    assert (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8") == results  # the benches record into $OUT


def test_a_stage_runs_alone_with_the_carried_wheels_and_nanogpt(tmp_path):
    """`tests` alone, with a GPU_DIR as bench/gpu_wheels.sh leaves it: a wheel installed offline, nanoGPT's
    model.py found there, both named in the summary."""
    gpu = tmp_path / "gpu"
    (gpu / "wheels").mkdir(parents=True)
    (gpu / "nanogpt").mkdir()
    (gpu / "nanogpt" / "model.py").write_text("class GPT: pass\n")
    with zipfile.ZipFile(gpu / "wheels" / "carried_probe-1.0-py3-none-any.whl", "w") as whl:
        info = "carried_probe-1.0.dist-info"
        whl.writestr("carried_probe.py", "")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    proc, rows, summary = gpu_sh(tmp_path, "--dry-run", "tests", GPU_DIR=str(gpu))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(rows) == ["tests"] and rows["tests"][0] == "ok" and "skipped" in rows["tests"][2], summary
    assert f"wheels: 1 from {gpu}/wheels installed offline" in summary
    assert f"nanoGPT: {gpu}/nanogpt/model.py" in summary


def test_an_unknown_stage_is_refused_with_the_usage(tmp_path):
    proc, _, _ = gpu_sh(tmp_path, "bogus")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash bench/gpu.sh")
    assert "suite" in proc.stderr and "e2e" in proc.stderr
