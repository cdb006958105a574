import argparse
import json
import subprocess
import sys

import pytest

from miniglm.cli import build_parser, main


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from subcommands(sub, (*prefix, name))


def test_help_on_every_subcommand(capsys):
    commands = list(subcommands(build_parser()))
    assert ("corpus", "prepare") in commands and ("tokenizer", "report") in commands and ("demo",) in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: miniglm" in capsys.readouterr().out


def test_no_abbreviated_options(capsys):
    """A typo that is a prefix of an option (`demo --lon`) is an error on every subcommand, not that option:
    `--lon` would otherwise start the 45-minute `--long` demo."""
    parser = build_parser()
    for cmd in subcommands(parser):
        sub = parser
        for name in cmd:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert not sub.allow_abbrev, cmd
    with pytest.raises(SystemExit) as e:
        main(["demo", "--lon"])
    assert e.value.code == 2 and "unrecognized arguments: --lon" in capsys.readouterr().err


def test_console_script():
    out = subprocess.run([sys.executable, "-m", "miniglm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "corpus" in out.stdout


def test_missing_path(capsys, tmp_path):
    err = run_error(capsys, ["corpus", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert "nope.txt: no such file" in err


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    err = run_error(capsys, ["corpus", "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")])
    assert "empty.txt: the file is empty" in err


def test_binary_file(capsys, tmp_path):
    (tmp_path / "x.txt").write_bytes(bytes(range(256)) * 4)
    err = run_error(capsys, ["corpus", "prepare", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")])
    assert "binary" in err


def test_undecodable_text_writes_nothing(capsys, tmp_path):
    novel = tmp_path / "novel"  # --out outside the folder read (inside it is refused: issue 22)
    novel.mkdir()
    (novel / "a.txt").write_text("第一回 好\n" + "天下大势。" * 20 + "\n第二回 坏\n正文。", encoding="utf-8")
    (novel / "b.txt").write_bytes("正文".encode() + b"\xff\x80\xff\x80")
    out = tmp_path / "o"
    err = run_error(capsys, ["corpus", "prepare", str(novel), "--out", str(out)])
    assert "b.txt" in err and "byte 6" in err and "--errors replace" in err
    assert not out.exists()
    assert main(["corpus", "prepare", str(novel), "--out", str(out), "--errors", "replace",
                 "--split", "file", "--val-fraction", "0.5"]) == 0
    assert (out / "train.jsonl").exists()


def test_malformed_jsonl_line(capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "一"}\n{"text": "二"}\n{"text": 三}\n', encoding="utf-8")
    err = run_error(capsys, ["corpus", "prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    assert "d.jsonl:3" in err and "not valid JSON" in err
    (tmp_path / "e.jsonl").write_text('{"body": "一"}\n', encoding="utf-8")
    err = run_error(capsys, ["corpus", "prepare", str(tmp_path / "e.jsonl"), "--out", str(tmp_path / "o")])
    assert "e.jsonl:line 1" in err and "--text-field" in err


def test_unknown_tokenizer(capsys, tmp_path, world_dir):
    corpus = tmp_path / "c"
    assert main(["corpus", "prepare", str(world_dir / "corpus.jsonl"), "--out", str(corpus), "--split", "file"]) == 0
    err = run_error(capsys, ["corpus", "tokenize", "--corpus", str(corpus), "--tokenizer", "no/such-tokenizer",
                             "--out", str(tmp_path / "d")])
    assert "unknown tokenizer 'no/such-tokenizer'" in err
    assert not (tmp_path / "d").exists()
    err = run_error(capsys, ["tokenizer", "report", "--corpus", str(tmp_path / "none"), "--tokenizer", "cl100k_base"])
    assert "none/val.jsonl: no such file" in err or "cl100k_base" in err


def test_demo_runs_the_pipeline(capsys, tmp_path):
    out = tmp_path / "demo"
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.block_size=48",
            "max_steps=4", "eval_every=2", "batch_size=4"]  # a probe at step 2: training goes on after it
    argv = ["demo", "--out", str(out), "--characters", "30", "--bios", "2", "--vocab-size", "300", "--questions", "10"]
    assert main([*argv, *sum((["--set", s] for s in tiny), [])]) == 0
    text = capsys.readouterr().out
    assert "demo done" in text and "held-out characters (10 questions): exact match" in text
    assert "baseline (most frequent answer per fact)" in text
    held_out = json.loads((out / "sft" / "eval" / "metrics.json").read_text())
    assert held_out["n"] == 10 and "most frequent answer per fact" in held_out["baselines"]
    assert (out / "sft" / "eval" / "report.html").exists() and (out / "sft" / "eval-train" / "report.md").exists()
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "../tokenizer" and meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert (out / "world" / "sft_test.jsonl").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert main(["tokenizer", "report", "--tokenizer", str(out / "tokenizer"), "--corpus", str(out / "corpus")]) == 0
    for stage in ["pretrain", "sft"]:
        assert (out / stage / "ckpt" / "model.safetensors").exists()
    assert json.loads((out / "sft" / "ckpt" / "state.json").read_text())["step"] == 4
    probes = [r for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").read_text().splitlines())
              if "probe_heldout_em" in r]
    assert [r["step"] for r in probes] == [2, 4]
    assert all(0 <= r["probe_heldout_em"] <= 1 and 0 <= r["probe_train_em"] <= 1 for r in probes)
    assert (out / "report.html").exists() and "held-out" in (out / "report.md").read_text()
    assert main([*argv, *sum((["--set", s] for s in tiny), [])]) == 0  # a second demo in the same folder


def test_demo_data_never_shows_held_out_questions(tmp_path):
    """No held-out character's question, Q&A pair or Q&A record reaches pretraining or SFT: their facts
    are only in biographies, so answering them measures what pretraining stored."""
    from miniglm.demo import DemoOptions, qa_prompt, run_demo

    out = tmp_path / "demo"
    run_demo(DemoOptions(out=str(out), characters=40, bios=3, vocab_size=300, questions=5, probe_questions=0,
                         overrides=["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "max_steps=1",
                                    "batch_size=2", "model.block_size=48"]), log=lambda *a: None)
    rows = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    held = rows(out / "world" / "sft_test.jsonl")
    held_out = {r["character"] for r in held}
    assert held and held_out.isdisjoint(r["character"] for r in rows(out / "world" / "sft_train.jsonl"))
    from miniglm.world import FACTS

    every_question = [q.format(n=name) for name in held_out for _, questions in FACTS.values() for q in questions]
    pretraining = "\n".join(r["text"] for split in ("train", "val") for r in rows(out / "corpus" / f"{split}.jsonl"))
    sft = (out / "world" / "sft_train.jsonl").read_text()
    for question in every_question:
        assert question not in pretraining and question not in sft
    for r in held:
        assert qa_prompt(r["question"]) + r["answer"] not in pretraining


def test_a_folder_killed_between_renames_is_recovered(tmp_path):
    from miniglm.fileio import atomic_dir, recover_dir

    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "state.json").write_text("1")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # as if killed after the first of two renames
    assert (recover_dir(tmp_path / "ckpt") / "state.json").read_text() == "1"


@pytest.mark.parametrize("flags, says", [
    (["--max-new-tokens", "-5"], "--max-new-tokens"), (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--seed", str(10**23)], "--seed"), (["--batch-size", "0"], "--batch-size"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "2"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--top-k", "-3"], "--top-k"),
])
def test_sampling_flags_out_of_range(capsys, tmp_path, flags, says):
    """Checked by SamplingParams.validate, the server's check too, before the run is loaded."""
    err = run_error(capsys, ["generate", "--run", str(tmp_path / "no-run"), "--prompt", "x", *flags])
    assert err.startswith(f"miniglm: error: {says} ")


def test_serve_port_errors(capsys, tmp_path):
    import socket

    err = run_error(capsys, ["serve", "--run", str(tmp_path), "--port", "99999"])
    assert "--port 99999" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        err = run_error(capsys, ["serve", "--run", str(tmp_path), "--port", str(busy.getsockname()[1])])
    assert "in use" in err and "serving" not in capsys.readouterr().out


def test_demo_long_pretrains_longer_and_set_still_wins():
    from miniglm.config import load_config
    from miniglm.demo import CONFIGS, LONG_FACTOR, DemoOptions, pretrain_extra

    steps = load_config(CONFIGS / "demo.toml").max_steps
    assert f"max_steps={LONG_FACTOR * steps}" in pretrain_extra(DemoOptions(long=True), 500)
    assert not any(x.startswith("max_steps") for x in pretrain_extra(DemoOptions(), 500))
    extra = pretrain_extra(DemoOptions(long=True, pretrain_overrides=["max_steps=7"]), 500)
    assert extra[-1] == "max_steps=7" and extra[0] == "model.vocab_size=500"
