"""Issue 22: outputs never destroy a run or an input (A), one writer per run folder (K), stdout that cannot
be written (H), and outputs that are the root, home or current folder (T). The one check is
fileio.check_output; the lock is fileio.output_lock, held by train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miniglm import fileio
from miniglm.cli import main
from tests.conftest import make_chat_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "model.vocab_size=400",
        "batch_size=2", "warmup_steps=1", "eval_batches=1", "log_every=1", "max_steps=2", "eval_every=2",
        "threads=1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def run_cli(argv: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory, world_dir, bpe_dir) -> dict[str, Path]:
    """Shards, a trained run (marked by train), a random-weight run and a LoRA run on it."""
    from miniglm.checkpoint import save_checkpoint
    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.lora import adapter_state, add_lora
    from miniglm.model import MiniGLM, ModelConfig
    from miniglm.shards import tokenize_corpus
    from miniglm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("made")
    prepare_corpus([str(world_dir / "corpus.jsonl")], root / "corpus", PrepareOptions(split="file", val_fraction=0.1))
    tokenize_corpus(root / "corpus", load_tokenizer(bpe_dir), root / "data")
    base = make_chat_run(root / "b", bpe_dir, block_size=32, n_layer=1)
    model = MiniGLM(ModelConfig(vocab_size=400, block_size=32, n_layer=1, n_head=2, n_embd=32))
    lora = add_lora(model, 4, 8)
    state = {"step": 1, "base_model": str((base / "ckpt").resolve())}
    save_checkpoint(root / "lora" / "ckpt", model, model.config, state,
                    adapter={"weights": adapter_state(model), "config": lora})
    load_tokenizer(bpe_dir).save(root / "lora" / "tokenizer")
    assert main(["train", *sets(f"data={root / 'data'}", f"out_dir={root / 'trained'}", *TINY)]) == 0
    return {"root": root, "data": root / "data", "corpus": root / "corpus", "base": base, "lora": root / "lora",
            "trained": root / "trained", "world": world_dir, "bpe": bpe_dir}


# --- A: a command replaces only its own kind of output, never an input --------------------------------
def test_export_replaces_an_export_but_not_a_run(made, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert run_cli(["train", *sets(f"data={made['data']}", f"out_dir={run}", *TINY)], capsys)[0] == 0
    before = tree(run)
    code, last = run_cli(["export", "--run", made["base"], "--to", "hf", "--out", run], capsys)
    assert code == 2 and last == (f"miniglm: error: {run}: holds a training run (written by `miniglm train`); "
                                  "`miniglm export` replaces only a transformers export; choose another --out, "
                                  "or pass --overwrite to replace it")
    assert tree(run) == before
    out = tmp_path / "hf"
    assert run_cli(["export", "--run", made["base"], "--to", "hf", "--out", out], capsys)[0] == 0
    assert run_cli(["export", "--run", made["trained"], "--to", "hf", "--out", out], capsys)[0] == 0  # export: ok
    code, last = run_cli(["corpus", "prepare", made["world"] / "corpus.jsonl", "--split", "file", "--out", out], capsys)
    assert code == 2 and "holds a transformers export" in last and "only a corpus" in last
    assert run_cli(["export", "--run", made["base"], "--to", "hf", "--out", run, "--overwrite"], capsys)[0] == 0


def test_a_demo_is_replaced_only_by_a_demo(tmp_path, capsys):
    demo = tmp_path / "demo"
    fileio.begin_command("demo")
    try:
        fileio.mark_dir(demo)
        (demo / "world").mkdir()
    finally:
        fileio.end_command()
    code, last = run_cli(["world", "--characters", 4, "--bios", 1, "--out", demo], capsys)
    assert code == 2 and "holds a demo (written by `miniglm demo`)" in last
    assert sorted(p.name for p in demo.iterdir()) == [".miniglm", "world"]


def test_an_eval_replaces_the_eval_a_demo_wrote(made, capsys, one_thread):
    """The demo writes RUN/sft/eval as part of itself; `miniglm eval` on that run replaces it (its files say
    it is an evaluation), while a corpus written by the demo is not an export's to replace."""
    run = made["base"]
    fileio.begin_command("demo")
    try:
        with fileio.atomic_dir(run / "eval") as tmp:
            fileio.write_json(tmp / "metrics.json", {"kind": "generation"})
        with fileio.atomic_dir(made["root"] / "demo_corpus") as tmp:
            fileio.write_json(tmp / "stats.json", {})
    finally:
        fileio.end_command()
    argv = ["eval", "ppl", "--run", run, "--text", made["corpus"] / "val.jsonl"]
    assert run_cli(argv, capsys)[0] == 0
    assert (run / "eval" / "perplexity.json").exists() and (run / "eval" / "metrics.json").exists()
    code, last = run_cli(["export", "--run", run, "--out", made["root"] / "demo_corpus"], capsys)
    assert code == 2 and "holds a corpus" in last


def test_merge_never_writes_over_the_base_it_reads(made, capsys):
    before = tree(made["base"])
    for out in (made["lora"], made["base"], made["base"] / "ckpt"):
        code, last = run_cli(["merge", made["lora"], "--out", out, "--overwrite"], capsys)
        assert code == 2 and "input of this command" in last, last
    assert tree(made["base"]) == before


def test_import_ckpt_into_a_training_run_is_refused(made, tmp_path, capsys):
    import torch

    from miniglm.model import MiniGLM, ModelConfig

    seed = MiniGLM(ModelConfig(style="gpt2", vocab_size=400, block_size=16, n_layer=1, n_head=2, n_embd=32))
    args = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "bias": True, "vocab_size": 400}
    torch.save({"model": seed.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    before = tree(made["trained"])
    code, last = run_cli(["import-ckpt", tmp_path / "ckpt.pt", "--out", made["trained"]], capsys)
    assert code == 2 and "holds a training run" in last and "replaces only an imported run" in last
    assert tree(made["trained"]) == before
    assert run_cli(["import-ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "imp"], capsys)[0] == 0
    assert run_cli(["import-ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "imp"], capsys)[0] == 0  # its own


def test_sft_test_out_never_overwrites_the_data(made, tmp_path, capsys):
    data = tmp_path / "oa.jsonl"
    data.write_bytes((made["world"] / "sft_train.jsonl").read_bytes())
    before = data.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    for test_out in (data, link):
        code, last = run_cli(["sft", "prepare", "--data", data, "--tokenizer", made["bpe"], "--out", tmp_path / "s",
                              "--test-out", test_out, "--test-count", 2], capsys)
        assert code == 2 and f"{test_out}: is also an input of this command" in last
    assert data.read_bytes() == before and not (tmp_path / "s").exists()


def test_a_run_resumes_into_its_own_out_dir(made, tmp_path, capsys, one_thread):
    """The one allowed case: a training run is its own input (init_from itself) when it resumes."""
    run = tmp_path / "r"
    argv = ["train", *sets(f"data={made['data']}", f"out_dir={run}", *TINY)]
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli([*argv, *sets("max_steps=3", f"init_from={run}")], capsys)[0] == 0
    assert json.loads((run / "ckpt" / "state.json").read_text())["step"] == 3


def test_check_output_compares_real_paths(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    with pytest.raises(fileio.UserError, match="is also an input"):
        fileio.check_output(tmp_path / "alias", [real])
    with pytest.raises(fileio.UserError, match="holds an input"):
        fileio.check_output(tmp_path, [tmp_path / "alias" / "x.txt"])
    with pytest.raises(fileio.UserError, match="is inside an input"):
        fileio.check_output(tmp_path / "alias" / "out", [real])
    fileio.check_output(tmp_path / "out", [real])  # beside it: fine
    fileio.check_output(tmp_path / "run", [tmp_path / "run" / "data"], grow=True)  # a run may hold its data


# --- K: one writer per run folder --------------------------------------------------------------------
HOLD = """
import sys
from miniglm import fileio
with fileio.output_lock(sys.argv[1]):
    fileio.write_json(sys.argv[1] + "/.miniglm", {"command": "train"})
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_train_on_one_out_dir_is_refused(made, tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", *sets(f"data={made['data']}", f"out_dir={run}", *TINY)]
        code, last = run_cli(argv, capsys)
        assert code == 2 and last == (f"miniglm: error: {run}: another miniglm process is writing this run now; "
                                      "wait for it to finish, or choose another out_dir")
        assert not (run / "metrics.jsonl").exists()
        holder.kill()  # kill -9: the kernel drops the lock, a stale lock file blocks nothing
        holder.wait()
        assert run_cli(argv, capsys)[0] == 0
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_after_a_run_and_leaves_nothing_on_a_refusal(made, tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    argv = ["train", *sets(f"data={made['data']}", f"out_dir={run}", *TINY)]
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli([*argv, "--set", "max_steps=3"], capsys)[0] == 0  # the same process, after the first
    assert run_cli(["train", *sets(f"data={tmp_path / 'nope'}", f"out_dir={tmp_path / 'x'}", *TINY)], capsys)[0] == 2
    assert not (tmp_path / "x").exists()  # the lock's folder is gone with it


def test_ranks_other_than_zero_take_no_lock(tmp_path):
    """torchrun: rank 0 holds the lock for the job; the others write nothing and lock nothing."""
    with fileio.output_lock(tmp_path / "r"):
        with fileio.output_lock(tmp_path / "r", writer=False):
            pass
        with pytest.raises(fileio.UserError, match="another miniglm process"):
            with fileio.output_lock(tmp_path / "r"):
                pass


# --- H: stdout ---------------------------------------------------------------------------------------
def _world(out: Path) -> list[str]:
    return [sys.executable, "-m", "miniglm.cli", "world", "--characters", "4", "--bios", "1", "--out", str(out)]


def test_a_closed_pipe_ends_quietly(tmp_path):
    r, w = os.pipe()
    os.close(r)  # `| head -0`: the reader is gone before the first line
    p = subprocess.run(_world(tmp_path / "w"), stdout=w, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    os.close(w)
    assert p.returncode == 141 and p.stderr == ""


def test_head_takes_one_line(tmp_path):
    p = subprocess.run(f"{' '.join(_world(tmp_path / 'w'))} | head -1; exit ${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert p.returncode in (0, 141) and "Traceback" not in p.stderr and p.stderr == ""
    assert len(p.stdout.splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_stdout_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run(_world(tmp_path / "w"), stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "miniglm: error: stdout: no space left on the device; free some space or write somewhere else"]


def test_a_closed_stdout_is_one_line_before_any_work(tmp_path):
    p = subprocess.run(f"{' '.join(_world(tmp_path / 'w'))} >&-", shell=True, executable="/bin/bash",
                       stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "miniglm: error: stdout is closed; redirect it to a file or to /dev/null"]
    assert not (tmp_path / "w").exists()


# --- T: the root, the home folder, the current folder; a GPU that is not there --------------------------
def test_root_home_and_current_folder_are_never_replaced(made, tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "home" / "work"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    argv = ["corpus", "prepare", made["world"] / "corpus.jsonl", "--split", "file", "--overwrite", "--out"]
    for out, says in [("/", "is the file system root"), (home, "is your home folder"), (".", "is the current folder"),
                      ("..", "is your home folder"), (tmp_path, "is a folder holding the current folder")]:
        code, last = run_cli([*argv, out], capsys)
        assert code == 2 and last == f"miniglm: error: {out}: {says}; miniglm never writes an output over it; " \
                                     "choose another --out", last
    assert [p.name for p in home.iterdir()] == ["work"] and list(cwd.iterdir()) == []
    assert run_cli([*argv, "c"], capsys)[0] == 0  # a new folder inside the current one is fine


def test_device_cuda_without_a_gpu_is_one_line(made, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    code, last = run_cli(["train", *sets(f"data={made['data']}", f"out_dir={tmp_path / 'r'}", *TINY, "device=cuda")],
                         capsys)
    assert code == 2 and last.startswith("miniglm: error: device 'cuda': torch sees no CUDA GPU") and \
        not (tmp_path / "r").exists()
