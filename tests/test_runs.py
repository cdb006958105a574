"""Opening runs (miniglm.runs): every damaged file of a run is one line naming it, in every command that
opens it; tokenizers that do not match their data, run or model are refused naming both (D4);
import-ckpt of a file that is no checkpoint is one line (D14). Each case runs the CLI in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from miniglm.cli import main
from miniglm.corpus import PrepareOptions, prepare_corpus
from miniglm.fileio import write_json
from miniglm.shards import tokenize_corpus
from miniglm.tokenizer import load_tokenizer, train_bpe

from .conftest import CL100K_FILE, shared_file

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.vocab_size=400",
        "batch_size=2", "warmup_steps=1", "eval_batches=1", "eval_every=2", "max_steps=2", "log_every=1"]


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *[a for kv in [f"data={data}", f"out_dir={out}", *TINY, *extra] for a in ("--set", kv)]]


@pytest.fixture(scope="module")
def made(tmp_path_factory, world_dir, bpe_dir, one_thread):
    """Shards of the test BPE, a base run with a chat template, a LoRA run on it, and a second tokenizer
    (300 ids) with its own shards."""
    root = tmp_path_factory.mktemp("runs")
    prepare_corpus([str(world_dir / "corpus.jsonl")], root / "corpus", PrepareOptions(split="file", val_fraction=0.1))
    tokenize_corpus(root / "corpus", load_tokenizer(bpe_dir), root / "data")
    texts = [line for line in (world_dir / "corpus.jsonl").read_text().splitlines()]
    other = train_bpe(texts, 300, root / "other_tok")
    tokenize_corpus(root / "corpus", other, root / "other_data")
    assert main(train_argv(root / "data", root / "base")) == 0
    write_json(root / "base" / "chat.json", {"template": "miniglm", "template_options": {}})
    assert main(train_argv(root / "data", root / "lora", f"init_from={root / 'base'}", "lora_r=2")) == 0
    return root


def copy_run(made: Path, tmp_path: Path, name: str = "base") -> Path:
    shutil.copytree(made / name, tmp_path / name)
    return tmp_path / name


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *names: str) -> str:
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("miniglm: error:"), err
    for name in names:
        assert name in last, last
    return last


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


DAMAGE = {
    "model.safetensors truncated": ("ckpt/model.safetensors", truncate),
    "model.safetensors empty": ("ckpt/model.safetensors", lambda p: p.write_bytes(b"")),
    "config.json broken": ("ckpt/config.json", truncate),
    "config.json wrong type": ("ckpt/config.json", lambda p: p.write_text('{"n_layer": "two"}')),
    "state.json broken": ("ckpt/state.json", truncate),
    "state.json a list": ("ckpt/state.json", lambda p: p.write_text("[1, 2]")),
    "chat.json broken": ("chat.json", truncate),
    "chat.json unknown template": ("chat.json", lambda p: p.write_text('{"template": "nope"}')),
    "tokenizer.json missing": ("tokenizer/tokenizer.json", lambda p: p.unlink()),
    "tokenizer.json truncated": ("tokenizer/tokenizer.json", truncate),
    "tokenizer_config.json bad": ("tokenizer/tokenizer_config.json", lambda p: p.write_text("{trained_by")),
    "optim.pt truncated": ("ckpt/optim.pt", truncate),
}


def command(name: str, run: Path, made: Path, tmp_path: Path) -> list[str]:
    return {
        "generate": ["generate", "--run", str(run), "--prompt", "你好", "--max-new-tokens", "2", "--device", "cpu"],
        "serve": ["serve", "--run", str(run), "--port", "0", "--device", "cpu"],
        "resume": train_argv(made / "data", run),
        "merge": ["merge", str(run), "--out", str(tmp_path / "merged")],
        "export": ["export", "--run", str(run), "--out", str(tmp_path / "hf")],
        "eval ppl": ["eval", "ppl", "--run", str(run), "--text", str(made / "corpus" / "val.jsonl")],
        "tokenizer report": ["tokenizer", "report", "--tokenizer", str(run / "tokenizer"),
                             "--corpus", str(made / "corpus")],
    }[name]


# merge is left out: a run without an adapter is refused before its files are read
# (test_merge_without_an_adapter_is_one_line); a LoRA run's damaged files: below
CASES = [
    ("model.safetensors truncated", ["generate", "serve", "resume", "export"]),
    ("model.safetensors empty", ["generate", "resume", "eval ppl"]),
    ("config.json broken", ["generate", "serve", "resume", "export"]),
    ("config.json wrong type", ["generate", "resume"]),
    ("state.json broken", ["generate", "serve", "resume", "export"]),
    ("state.json a list", ["generate", "resume"]),
    ("chat.json broken", ["generate", "serve", "export"]),
    ("chat.json unknown template", ["generate"]),
    ("tokenizer.json missing", ["generate", "serve", "export", "tokenizer report"]),
    ("tokenizer.json truncated", ["generate", "serve", "tokenizer report"]),
    ("tokenizer_config.json bad", ["generate", "tokenizer report"]),
    ("optim.pt truncated", ["resume"]),
]


@pytest.fixture
def no_server(monkeypatch):
    """serve must fail before it serves: a run that loads would otherwise block the test."""
    import miniglm.serve

    def refuse(*args, **kwargs):
        raise AssertionError("the damaged run loaded and serve started")

    monkeypatch.setattr(miniglm.serve, "Server", refuse)


@pytest.mark.parametrize("kind,cmd", [(k, c) for k, cmds in CASES for c in cmds])
def test_a_damaged_file_is_one_line_naming_it(kind, cmd, made, tmp_path, capsys, no_server):
    run = copy_run(made, tmp_path)
    rel, damage = DAMAGE[kind]
    damage(run / rel)
    code, err = run_cli(command(cmd, run, made, tmp_path), capsys)
    assert_one_line(code, err, str(run / rel))


def test_merge_without_an_adapter_is_one_line(made, tmp_path, capsys):
    """A full run has nothing to merge: one line, nothing written (it said "merged the adapter")."""
    code, err = run_cli(["merge", str(made / "base"), "--out", str(tmp_path / "merged")], capsys)
    assert_one_line(code, err, "no LoRA adapter to merge")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("rel,cmd", [("ckpt/adapter.safetensors", "generate"), ("ckpt/adapter.safetensors", "resume"),
                                     ("ckpt/adapter.safetensors", "merge"), ("ckpt/adapter_config.json", "generate"),
                                     ("ckpt/adapter_config.json", "merge")])  # resume takes the config's LoRA keys
def test_a_damaged_adapter_is_one_line_naming_it(rel, cmd, made, tmp_path, capsys):
    run = copy_run(made, tmp_path, "lora")
    truncate(run / rel)
    argv = command(cmd, run, made, tmp_path)
    if cmd == "resume":
        argv = train_argv(made / "data", run, f"init_from={made / 'base'}", "lora_r=2")
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, str(run / rel))


def test_runs_open_intact(made, tmp_path, capsys):
    """The pristine runs load, merge, and resume; state.json records the tokenizer's identity."""
    from miniglm import runs

    lora = copy_run(made, tmp_path, "lora")
    assert runs.open_run(lora).state["tokenizer_identity"] == runs.tokenizer_identity(made / "base")
    assert main(["merge", str(lora), "--out", str(tmp_path / "merged")]) == 0
    assert main(["generate", "--run", str(tmp_path / "merged"), "--prompt", "你好", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert main(train_argv(made / "data", lora, f"init_from={made / 'base'}", "lora_r=2", "max_steps=3")) == 0


# --- D4: tokenizers that do not match ------------------------------------------------------------
def test_resume_on_shards_of_another_tokenizer(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    code, err = run_cli(train_argv(made / "other_data", run), capsys)
    assert_one_line(code, err, str(made / "other_data"), str(run), "300 ids", "400 ids")


def test_init_from_a_run_on_shards_of_another_tokenizer(made, tmp_path, capsys):
    code, err = run_cli(train_argv(made / "other_data", tmp_path / "new", f"init_from={made / 'base'}"), capsys)
    assert_one_line(code, err, str(made / "other_data"), str(made / "base"))


def test_a_given_tokenizer_that_is_not_the_datas(made, tmp_path, capsys):
    code, err = run_cli(train_argv(made / "data", tmp_path / "new", f"tokenizer={made / 'other_tok'}"), capsys)
    assert_one_line(code, err, str(made / "data"), "300 ids", "400 ids")


def test_a_run_with_another_tokenizer_put_in(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    shutil.rmtree(run / "tokenizer")
    load_tokenizer(made / "other_tok").save(run / "tokenizer")
    for cmd in ("generate", "export"):  # merge refuses a run without an adapter first
        code, err = run_cli(command(cmd, run, made, tmp_path), capsys)
        assert_one_line(code, err, str(run / "tokenizer"), "300 ids", "400 ids")


def test_a_tokenizer_with_more_ids_than_the_model(tmp_path, bpe_dir, capsys):
    """A run without a recorded identity (made by hand): 400 token ids over a 300-id embedding."""
    from miniglm.checkpoint import save_checkpoint
    from miniglm.model import MiniGLM, ModelConfig

    model = MiniGLM(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 1})
    load_tokenizer(bpe_dir).save(tmp_path / "run" / "tokenizer")
    code, err = run_cli(["generate", "--run", str(tmp_path / "run"), "--prompt", "x", "--device", "cpu"], capsys)
    assert_one_line(code, err, str(tmp_path / "run" / "tokenizer"), "400", "300")


def test_a_model_with_more_ids_than_its_tokenizer_never_samples_them(tmp_path, bpe_dir, capsys):
    """A 4,096-id model under the 400-id test BPE: sampling stays within the tokenizer's ids."""
    from miniglm.checkpoint import save_checkpoint
    from miniglm.model import MiniGLM, ModelConfig

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=4096, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 1})
    load_tokenizer(bpe_dir).save(tmp_path / "run" / "tokenizer")
    argv = ["generate", "--run", str(tmp_path / "run"), "--prompt", "你好", "--max-new-tokens", "40",
            "--temperature", "1.5", "--seed", "1", "--device", "cpu"]
    assert main(argv) == 0


# --- D14: import-ckpt of a file that is no checkpoint ----------------------------------------------
@pytest.mark.parametrize("name,content,why", [
    ("cover.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "a PNG image"),
    ("empty.pt", b"", "the file is empty"),
    ("notes.pt", b"hello, world", "starts with b'hello, w'"),
])
def test_import_ckpt_of_a_file_that_is_no_checkpoint(name, content, why, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    code, err = run_cli(["import-ckpt", str(tmp_path / name), "--out", str(tmp_path / "run")], capsys)
    last = assert_one_line(code, err, str(tmp_path / name), "not a PyTorch checkpoint", why)
    assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err, last


def test_plot_names_a_damaged_metrics_line_and_skips_a_torn_last_one(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')  # killed mid-line
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").exists()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    code, err = run_cli(["plot", str(run)], capsys)
    assert_one_line(code, err, f"{run / 'metrics.jsonl'}:2")


def test_a_seed_checkpoint_on_cl100k_base_imports_and_generates(tmp_path, capsys):
    """The seed's models embed cl100k_base's 100,277 ids; our tiktoken tokenizer adds pad and chat-role ids
    after them, which plain text never encodes to: such a run opens."""
    from miniglm.model import MiniGLM, ModelConfig

    model = MiniGLM(ModelConfig(style="gpt2", vocab_size=100277, block_size=16, n_layer=1, n_head=2, n_embd=8))
    args = {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, "bias": True, "vocab_size": 100277}
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    tok = str(shared_file(CL100K_FILE))
    assert main(["import-ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "seed"), "--tokenizer", tok]) == 0
    assert main(["generate", "--run", str(tmp_path / "seed"), "--prompt", "你好", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
