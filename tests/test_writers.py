"""Writing outputs: nothing lost (D1), nothing half-written (D3, fault injection), one line for an output
that cannot be written (D7), and readers that survive a torn log (D10)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miniglm import fileio
from miniglm.cli import main
from tests.conftest import make_chat_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.vocab_size=400",
        "batch_size=4", "lr=3e-3", "warmup_steps=1", "eval_batches=1", "log_every=1", "max_steps=4",
        "eval_every=2", "threads=1"]


def sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, world_dir, bpe_dir) -> dict[str, Path]:
    """Tiny inputs for every command: a corpus, shards, runs (one with a LoRA adapter), a seed ckpt.pt."""
    from miniglm.checkpoint import save_checkpoint
    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.lora import adapter_state, add_lora
    from miniglm.model import MiniGLM, ModelConfig
    from miniglm.shards import tokenize_corpus
    from miniglm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    corpus = str(world_dir / "corpus.jsonl")
    for name, seed in [("corpus", 1), ("corpus2", 2)]:
        prepare_corpus([corpus], root / name, PrepareOptions(split="file", val_fraction=0.1, seed=seed))
    tokenize_corpus(root / "corpus", load_tokenizer(bpe_dir), root / "data")
    run = make_chat_run(root / "a", bpe_dir, block_size=32, n_layer=2)
    run2 = make_chat_run(root / "b", bpe_dir, block_size=32, n_layer=1)
    for r in (run, run2):  # llama style, as make_chat_run makes it: GGUF needs it
        assert json.loads((r / "ckpt" / "config.json").read_text())["style"] == "llama"
    for name, init in (("lora", True), ("lora2", False)):  # lora2: other adapter weights, another merged model
        model = MiniGLM(ModelConfig(vocab_size=400, block_size=32, n_layer=2, n_head=2, n_embd=32))
        lora = add_lora(model, 4, 8, init=init)
        save_checkpoint(root / name / "ckpt", model, model.config,
                        {"step": 1, "base_model": str((run / "ckpt").resolve())},
                        adapter={"weights": adapter_state(model), "config": lora})
        load_tokenizer(bpe_dir).save(root / name / "tokenizer")
    torch.manual_seed(0)
    seed = MiniGLM(ModelConfig(style="gpt2", vocab_size=400, block_size=32, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": seed.state_dict(), "model_args": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                                                           "bias": True, "vocab_size": 400}},
               root / "ckpt.pt")
    return {"root": root, "world": world_dir, "bpe": bpe_dir, "run": run, "run2": run2, "lora": root / "lora",
            "lora2": root / "lora2"}


def fault_specs(i: dict[str, Path], out: Path) -> list[dict]:
    from tests.test_hf import make_hf_model, write_csv

    hf_model = make_hf_model(i["root"], "gpt2", i["bpe"])
    csv = write_csv(i["root"] / "raft.csv")
    w, c, bpe = i["world"], i["root"] / "corpus", str(i["bpe"])

    def spec(name: str, argv: list[str], prev: list[str] | None = None, run: bool = False, most: int = 12) -> dict:
        o = str(out / name.replace(" ", "_"))
        return {"name": name, "argv": [a.replace("{out}", o) for a in argv], "out": o, "run": run,
                "max_points": most, "prev_argv": [a.replace("{out}", o) for a in prev] if prev else None}

    sft = ["sft", "prepare", "--data", str(w / "sft_train.jsonl"), "--tokenizer", bpe, "--max-len", "64",
           "--out", "{out}"]
    ev = ["eval", "--run", str(i["run"]), "--data", str(w / "sft_test.jsonl"), "--embedder", "none",
          "--max-new-tokens", "3", "--out", "{out}"]
    gguf = ["export", "--run", str(i["run"]), "--to", "gguf", "--out", "{out}"]
    return [
        spec("corpus prepare", ["corpus", "prepare", str(w / "corpus.jsonl"), "--split", "file", "--out", "{out}"],
             ["corpus", "prepare", str(w / "corpus.jsonl"), "--split", "file", "--seed", "2", "--out", "{out}"]),
        spec("corpus tokenize", ["corpus", "tokenize", "--corpus", str(c), "--tokenizer", bpe, "--out", "{out}"],
             ["corpus", "tokenize", "--corpus", str(i["root"] / "corpus2"), "--tokenizer", bpe, "--out", "{out}"]),
        spec("tokenizer train", ["tokenizer", "train", "--corpus", str(c), "--vocab-size", "300", "--out", "{out}"],
             ["tokenizer", "train", "--corpus", str(c), "--vocab-size", "290", "--out", "{out}"]),
        spec("sft prepare", sft, [*sft, "--seed", "2"]),
        spec("train", ["train", *sets(f"data={i['root'] / 'data'}", "out_dir={out}", *TINY)], run=True, most=24),
        spec("export hf", ["export", "--run", str(i["run"]), "--to", "hf", "--out", "{out}"],
             ["export", "--run", str(i["run2"]), "--to", "hf", "--out", "{out}"]),
        spec("export gguf", gguf, [*gguf, "--outtype", "f16"]),
        spec("import-ckpt", ["import-ckpt", str(i["root"] / "ckpt.pt"), "--tokenizer", bpe, "--out", "{out}"],
             ["import-ckpt", str(i["root"] / "ckpt.pt"), "--out", "{out}"]),
        spec("merge", ["merge", str(i["lora"]), "--out", "{out}"], ["merge", str(i["lora2"]), "--out", "{out}"]),
        spec("finetune", ["finetune", "--model", str(hf_model), "--data", str(csv), "--columns", "Tweet text,Label",
                          "--out", "{out}", *sets("max_steps=2", "eval_every=2", "batch_size=2", "eval_batches=1")],
             run=True),
        spec("eval", [*ev, "--limit", "4"], [*ev, "--limit", "3"], most=10),
    ]


COMMANDS = ["corpus prepare", "corpus tokenize", "tokenizer train", "sft prepare", "train", "export hf",
            "export gguf", "import-ckpt", "merge", "finetune", "eval"]


@pytest.fixture(scope="module")
def fault_results(tmp_path_factory, inputs) -> dict:
    """Every command killed at its write points, in one process that forks a child per run."""
    root = tmp_path_factory.mktemp("faults")
    (root / "specs.json").write_text(json.dumps(fault_specs(inputs, root / "out")))
    (root / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tests.killpoints", str(root / "specs.json"), str(root / "results.json")],
                   cwd=ROOT, env=env, check=True, timeout=600)
    results = json.loads((root / "results.json").read_text())
    print(f"fault injection: {time.perf_counter() - t0:.1f}s, points per command: "
          + ", ".join(f"{k} {len(v['tested'])}/{v['points']}" for k, v in results.items()))
    return results


@pytest.mark.parametrize("command", COMMANDS)
def test_a_kill_at_any_write_leaves_no_half_written_output(command, fault_results):
    r = fault_results[command]
    assert not r["failures"], "\n\n".join(r["failures"][:3])
    # gguf: one file written by gguf's own writer: its header, metadata and tensors, then the rename
    assert len(r["tested"]) >= (5 if command == "export gguf" else 10), r


# --- D1: nothing lost ---------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def out_commands(i: dict[str, Path], out: Path) -> dict[str, list]:
    """Each command that writes a folder, with --out OUT."""
    w, bpe = i["world"], i["bpe"]
    return {
        "world": ["world", "--characters", 4, "--bios", 1, "--out", out],
        "corpus prepare": ["corpus", "prepare", w / "corpus.jsonl", "--split", "file", "--out", out],
        "corpus tokenize": ["corpus", "tokenize", "--corpus", i["root"] / "corpus", "--tokenizer", bpe, "--out", out],
        "tokenizer train": ["tokenizer", "train", "--corpus", i["root"] / "corpus", "--vocab-size", 300, "--out", out],
        "sft prepare": ["sft", "prepare", "--data", w / "sft_train.jsonl", "--tokenizer", bpe, "--out", out],
        "train": ["train", *sets(f"data={i['root'] / 'data'}", f"out_dir={out}", *TINY, "max_steps=1")],
        "export hf": ["export", "--run", i["run"], "--to", "hf", "--out", out],
        "import-ckpt": ["import-ckpt", i["root"] / "ckpt.pt", "--out", out],
        "merge": ["merge", i["lora"], "--out", out],
        "eval": ["eval", "--run", i["run"], "--data", w / "sft_test.jsonl", "--limit", 2, "--embedder", "none",
                 "--max-new-tokens", 2, "--out", out],
        "eval ppl": ["eval", "ppl", "--run", i["run"], "--text", i["root"] / "corpus" / "val.jsonl", "--out", out],
        "demo": ["demo", "--characters", 4, "--out", out],
    }


@pytest.mark.parametrize("command", ["world", "corpus prepare", "corpus tokenize", "tokenizer train", "sft prepare",
                                     "train", "export hf", "import-ckpt", "merge", "eval", "eval ppl", "demo"])
def test_a_folder_miniglm_did_not_write_is_refused_then_overwritten(command, tmp_path, inputs, capsys, one_thread):
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    code, last = run_cli(out_commands(inputs, out)[command], capsys)
    assert code == 2 and last.startswith(f"miniglm: error: {out}") and "--overwrite" in last
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    if command == "demo":
        return  # the whole demo is minutes; its refusal is what matters here
    argv = out_commands(inputs, out)[command]
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0
    assert fileio.is_marked(out)
    assert run_cli(argv, capsys)[0] == 0  # a rerun replaces its own output


@pytest.mark.parametrize("command", ["world", "corpus prepare", "corpus tokenize", "train", "export hf", "eval"])
def test_an_out_that_is_a_file_is_refused_and_kept(command, tmp_path, inputs, capsys, one_thread):
    out = tmp_path / "f"
    out.write_text("keep me")
    code, last = run_cli(out_commands(inputs, out)[command], capsys)
    assert code == 2 and last == f"miniglm: error: {out}: is a file, not a folder; choose another --out"
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_gguf_out_refuses_a_folder_and_a_foreign_file(tmp_path, inputs, capsys):
    argv = ["export", "--run", inputs["run"], "--to", "gguf", "--out"]
    code, last = run_cli([*argv, tmp_path], capsys)
    assert code == 2 and last.startswith(f"miniglm: error: {tmp_path}: is a folder")
    other = tmp_path / "m.gguf"
    other.write_text("not a gguf")
    code, last = run_cli([*argv, other], capsys)
    assert code == 2 and "--overwrite" in last and other.read_text() == "not a gguf"
    assert run_cli([*argv, other, "--overwrite"], capsys)[0] == 0
    assert run_cli([*argv, other], capsys)[0] == 0  # a .gguf replaces a .gguf
    assert other.read_bytes()[:4] == b"GGUF"


def test_generate_file_that_is_a_folder(tmp_path, inputs, capsys):
    code, last = run_cli(["generate", "--run", inputs["run"], "--file", tmp_path], capsys)
    assert code == 2 and last.startswith(f"miniglm: error: {tmp_path}: is a folder")


def test_demo_stage_folders_are_replaced_on_rerun(tmp_path):
    """demo removes its model stages before training them anew: only folders it marked."""
    run = fileio.mark_dir(tmp_path / "demo")
    (run / "pretrain").mkdir()
    (run / "pretrain" / "mine.txt").write_text("x")
    with pytest.raises(fileio.UserError, match="not written by miniglm"):
        fileio.remove_output(run / "pretrain")
    fileio.mark_dir(run / "sft")
    fileio.remove_output(run / "sft")
    assert not (run / "sft").exists() and (run / "pretrain" / "mine.txt").exists()


# --- D7: an output that cannot be written is one line --------------------------------------------------
def _fail_with(code: int):
    def replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))
    return replace


@pytest.mark.parametrize("code,says", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"),
                                       (errno.EACCES, "permission denied"), (errno.ENAMETOOLONG, "too long")])
@pytest.mark.parametrize("command", ["world", "corpus prepare", "corpus tokenize", "export hf"])
def test_a_disk_that_refuses_the_write_is_one_line(command, code, says, tmp_path, inputs, capsys, monkeypatch,
                                                  one_thread):
    out = tmp_path / "o"
    monkeypatch.setattr(fileio.os, "replace", _fail_with(code))
    rc, last = run_cli(out_commands(inputs, out)[command], capsys)
    assert rc == 2 and last.startswith(f"miniglm: error: {out}") and says in last
    assert os.listdir(tmp_path) == []  # no partial output, no temporary files


def test_a_name_too_long_is_one_line(tmp_path, inputs, capsys):
    out = tmp_path / ("x" * 300)
    rc, last = run_cli(out_commands(inputs, out)["corpus prepare"], capsys)
    assert rc == 2 and last == f"miniglm: error: {out}: the name is too long; choose a shorter path"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path, inputs, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        rc, last = run_cli(out_commands(inputs, tmp_path / "ro" / "o")["world"], capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert rc == 2 and "permission denied" in last and os.listdir(tmp_path / "ro") == []


@pytest.mark.parametrize("command", ["world", "corpus prepare", "corpus tokenize", "eval"])
def test_a_file_in_the_way_of_the_path_is_one_line(command, tmp_path, inputs, capsys, one_thread):
    (tmp_path / "f").write_text("x")
    rc, last = run_cli(out_commands(inputs, tmp_path / "f" / "o")[command], capsys)
    assert rc == 2 and last.startswith(f"miniglm: error: {tmp_path / 'f'}")


# --- D3: inputs are checked before anything is written; orphans are cleaned ------------------------------
def test_tokenize_reads_both_splits_before_writing(tmp_path, inputs, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text((inputs["root"] / "corpus" / "train.jsonl").read_text())
    argv = ["corpus", "tokenize", "--corpus", corpus, "--tokenizer", inputs["bpe"], "--out", tmp_path / "d"]
    rc, last = run_cli(argv, capsys)
    assert rc == 2 and "val.jsonl" in last and not (tmp_path / "d").exists()


def test_import_ckpt_checks_the_tokenizer_before_writing(tmp_path, inputs, capsys):
    rc, last = run_cli(["import-ckpt", inputs["root"] / "ckpt.pt", "--tokenizer", tmp_path / "nope.tiktoken",
                        "--out", tmp_path / "r"], capsys)
    assert rc == 2 and "nope.tiktoken" in last and not (tmp_path / "r").exists()


def test_orphans_of_a_dead_process_are_cleaned_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "meta.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".meta.json.{dead.stdout.strip()}.abc123.tmp"
    orphan.write_text("half")
    live = tmp_path / f".meta.json.{os.getppid()}.abc123.tmp"  # another process, still writing
    live.write_text("busy")
    foreign = tmp_path / ".meta.json.notes.tmp"  # not our naming pattern
    foreign.write_text("x")
    fileio.write_json(out, {"a": 1})
    assert not orphan.exists() and live.exists() and foreign.exists()


# --- D10: a torn metrics.jsonl, an incomplete metrics.json -----------------------------------------------
def test_readers_skip_a_torn_last_line_and_resume_drops_it(tmp_path, inputs, capsys, one_thread):
    from miniglm.plot import read_metrics

    run = tmp_path / "r"
    argv = ["train", *sets(f"data={inputs['root'] / 'data'}", f"out_dir={run}", *TINY, "max_steps=2")]
    assert run_cli(argv, capsys)[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 2]
    assert run_cli(["plot", run], capsys)[0] == 0
    assert run_cli(["train", *argv[1:], "--set", "max_steps=3"], capsys)[0] == 0  # resume
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2, 3, 3]


@pytest.mark.parametrize("content", ['{"kind": "generation", "n": 4, "al', '{"kind": "generation", "n": 4}', ""])
def test_report_on_an_incomplete_metrics_json(content, tmp_path, capsys):
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "metrics.json").write_text(content)
    rc, last = run_cli(["report", tmp_path / "run"], capsys)
    path = tmp_path / "run" / "eval" / "metrics.json"
    assert rc == 2 and last == f"miniglm: error: {path}: the file is incomplete; rerun `miniglm eval`"
