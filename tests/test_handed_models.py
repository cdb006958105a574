"""Nothing changes a model it was handed, and one rule picks the device.

Every function that takes a model (not a run folder) is called on a model in train mode, and the model
must come back as it was: each module's train/eval flag, each tensor's device, dtype, storage and values.
On a CPU machine a device move would be a no-op, so the engine's copy is also checked to share no
Parameter object with the model (a `.to(device)` of the copy would otherwise move the caller's weights).

The functions that take a model:
- Engine (generate, stream) and for_decoding          miniglm.engine
- KnowledgeProbe, called by training at each evaluation  miniglm.demo
- perplexity (evaluation)                            miniglm.evaluate
- HFEngine (generation and classification scoring of Hugging Face runs)  miniglm.hf_engine
- to_hf_state_dict (export)                          miniglm.export
- merge_lora (merge)                                 miniglm.lora
- save_with_eos (merge of a Hugging Face run)        miniglm.hf
- create_app and its Batcher (the server's loader)   miniglm.serve
"""

from __future__ import annotations

import threading

import pytest
import torch

from miniglm.devices import evaluating, model_device, resolve_device
from miniglm.engine import Engine, SamplingParams
from miniglm.fileio import UserError
from miniglm.model import MiniGLM
from miniglm.tokenizer import load_tokenizer
from tests.helpers import tiny


def snapshot(model: torch.nn.Module) -> dict:
    tensors = {f"p:{n}": t for n, t in model.named_parameters()} | {f"b:{n}": t for n, t in model.named_buffers()}
    return {"flags": [(n, m.training) for n, m in model.named_modules()],
            "tensors": {n: (t.device, t.dtype, t.data_ptr(), t.requires_grad, t.detach().clone())
                        for n, t in tensors.items()}}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["flags"] == before["flags"], "a train/eval flag changed"
    assert after["tensors"].keys() == before["tensors"].keys(), "modules were replaced"
    for name, (device, dtype, ptr, grad, value) in before["tensors"].items():
        d, t, p, g, v = after["tensors"][name]
        assert (d, t, p, g) == (device, dtype, ptr, grad), f"{name}: moved, cast, reallocated or flag changed"
        assert torch.equal(v, value), f"{name}: values changed"


def training_model(style: str = "llama", vocab: int = 400) -> MiniGLM:
    """A model as a training loop holds it: in train mode, with dropout (so the flag matters)."""
    return tiny(style, vocab_size=vocab, block_size=48, dropout=0.1).train()


# CUDA where there is a GPU (bench/gpu.sh runs the suite there): the move a CPU cannot show
DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_engine_leaves_the_model_as_it_was(style, device, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    model = training_model(style, vocab=512).to(device)  # padded past the tokenizer's 400 ids: the copy's head is cut
    before = snapshot(model)
    eng = Engine(model, tok)
    eng.generate([tok.encode("天下大势")], SamplingParams(max_new_tokens=8))
    list(eng.stream(tok.encode("天下"), SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)))
    assert_unchanged(model, before)
    assert eng.device == str(model_device(model)) == device  # the model's own device by default
    assert not ({id(p) for p in eng.model.parameters()} & {id(p) for p in model.parameters()})
    assert not eng.model.training and eng.model.lm_head.weight.shape[-1 if eng.model.lm_head.transposed else 0] == 400


def test_engine_on_another_device_moves_a_copy(bpe_dir, monkeypatch):
    """Engine(model, device=...) puts its copy there: what .to() receives is the copy, never the model."""
    tok = load_tokenizer(bpe_dir)
    model = training_model()
    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        moved.append(self)
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    Engine(model, tok, device="cpu")
    assert moved and all(m is not model and not any(m is x for x in model.modules()) for m in moved)


def test_knowledge_probe_leaves_the_training_model(world_dir, bpe_dir):
    from miniglm.demo import KnowledgeProbe

    tok = load_tokenizer(bpe_dir)
    model = training_model()
    before = snapshot(model)
    result = KnowledgeProbe(world_dir, tok, 4)(model)
    assert set(result) == {"probe_heldout_em", "probe_train_em"}
    assert_unchanged(model, before)


def test_perplexity_leaves_the_model(bpe_dir):
    from miniglm.evaluate import perplexity

    tok = load_tokenizer(bpe_dir)
    model = training_model()
    before = snapshot(model)
    a = perplexity(model, tok, ["话说天下大势，分久必合，合久必分。"] * 4, stride=16)
    b = perplexity(model, tok, ["话说天下大势，分久必合，合久必分。"] * 4, stride=16)
    assert a == b  # scored in eval mode: dropout off, so the same twice
    assert_unchanged(model, before)


def test_export_state_dict_leaves_the_model():
    from miniglm.export import to_hf_state_dict

    for style in ("llama", "gpt2"):
        model = training_model(style)
        before = snapshot(model)
        to_hf_state_dict(model)
        assert_unchanged(model, before)


def test_merge_lora_returns_a_merged_copy():
    from miniglm.lora import add_lora, merge_lora

    model = training_model()
    add_lora(model, 4, 8, init=False)  # random B: the merge changes the weights it folds into
    before = snapshot(model)
    x = torch.randint(0, 400, (1, 12))
    with evaluating(model), torch.no_grad():
        want = model(x)[0]
    merged = merge_lora(model)
    assert_unchanged(model, before)
    with torch.no_grad():
        got = merged.eval()(x)[0]
    # the merged weight W + BA against W x + B(A x): float32 roundings of sums of size |logits|
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert not any("lora" in n for n, _ in merged.named_parameters())


def _hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from miniglm.hf import FAMILIES, HFCausalLM

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=0, bos_token_id=0)
    return HFCausalLM(GPT2LMHeadModel(cfg), FAMILIES["gpt2"]).train()


def test_hf_engine_and_merge_save_leave_the_model(bpe_dir, tmp_path):
    from miniglm.hf import save_with_eos
    from miniglm.hf_engine import HFEngine

    tok = load_tokenizer(bpe_dir)
    model = _hf_model()
    before = snapshot(model)
    eos = model.model.config.eos_token_id
    eng = HFEngine(model, tok)
    eng.generate([tok.encode("天下")], SamplingParams(max_new_tokens=4))
    list(eng.stream(tok.encode("天下"), SamplingParams(max_new_tokens=4)))
    save_with_eos(model.model, [1, 2], tmp_path / "merged")
    assert_unchanged(model, before)
    assert model.model.config.eos_token_id == eos
    written = "".join(f.read_text() for f in (tmp_path / "merged").glob("*.json"))
    assert '"eos_token_id": [\n    1,\n    2\n  ]' in written


def test_server_loader_leaves_the_models(bpe_dir):
    from miniglm.batcher import Job
    from miniglm.chat import LoadedRun
    from miniglm.serve import create_app
    from miniglm.sft.templates import TemplateOptions

    tok = load_tokenizer(bpe_dir)
    model = training_model()
    before = snapshot(model)
    eng = Engine(model, tok)
    copy_before = snapshot(eng.model)
    app = create_app(LoadedRun(eng, "miniglm", TemplateOptions(), "t"))
    done = threading.Event()
    try:
        app.state.batcher.submit(Job(tok.encode("天下"), SamplingParams(max_new_tokens=4),
                                     lambda event: "done" in event and done.set()))
        assert done.wait(30)
    finally:
        app.state.batcher.stop()
    assert_unchanged(model, before)
    assert_unchanged(eng.model, copy_before)


@pytest.mark.parametrize("device", DEVICES)
def test_training_goes_on_after_a_probe(tmp_path, world_dir, bpe_dir, device):
    """The probe runs at every evaluation, and training goes on after it with the model as it left it:
    the losses of a run probed at steps 2 and 4 are those of the same run unprobed (dropout on, so the
    train flag matters; the probe draws no training randomness)."""
    from miniglm.config import load_config
    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.demo import KnowledgeProbe
    from miniglm.fileio import read_jsonl
    from miniglm.shards import tokenize_corpus
    from miniglm.train import train

    tok = load_tokenizer(bpe_dir)
    prepare_corpus([str(world_dir / "corpus.jsonl")], tmp_path / "corpus", PrepareOptions(split="file"))
    tokenize_corpus(tmp_path / "corpus", tok, tmp_path / "data")
    sets = [f"data={tmp_path / 'data'}", "max_steps=6", "eval_every=2", "eval_batches=1", "batch_size=2",
            "log_every=1", "model.vocab_size=400", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32", "model.dropout=0.1", "warmup_steps=1", f"device={device}", "compile=false"]
    probed = train(load_config(None, [*sets, f"out_dir={tmp_path / 'a'}"]), log=lambda *_: None,
                   probe=KnowledgeProbe(world_dir, tok, 2))
    plain = train(load_config(None, [*sets, f"out_dir={tmp_path / 'b'}"]), log=lambda *_: None)
    assert probed["val_loss"] == plain["val_loss"]

    def losses(run):
        return [r["loss"] for _, r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]
    assert losses("a") == losses("b") and len(losses("a")) == 6
    assert [r for _, r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "probe_heldout_em" in r][0]["step"] == 2


def test_one_device_rule(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:0"  # always an index: what the run records
    with pytest.raises(UserError, match=r"has 1 GPU \(cuda:0\)"):
        resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun --nproc_per_node 2 on this machine: rank 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun started 2 processes on this machine but it has 1 GPU: use "
                                        "--nproc_per_node 1 or fewer"):
        resolve_device("auto")


def test_train_records_the_device_it_used(tmp_path, world_dir, bpe_dir):
    """config.toml says where the run trained ("cpu" here), not "auto"; compile "auto" is off on the CPU."""
    import tomllib

    from miniglm.config import load_config
    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.shards import tokenize_corpus
    from miniglm.train import train

    tok = load_tokenizer(bpe_dir)
    prepare_corpus([str(world_dir / "corpus.jsonl")], tmp_path / "corpus", PrepareOptions(split="file"))
    tokenize_corpus(tmp_path / "corpus", tok, tmp_path / "data")
    cfg = load_config(None, [f"data={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}", "max_steps=1",
                             "eval_batches=1", "batch_size=2", "model.vocab_size=400", "model.n_layer=1",
                             "model.n_head=2", "model.n_embd=32", "model.block_size=32"])
    assert (cfg.device, cfg.compile) == ("auto", "auto")
    logs = []
    train(cfg, log=logs.append)
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert recorded["device"] == "cpu" and recorded["compile"] == "auto"
    assert not any("torch.compile" in line for line in logs)


def test_a_device_not_there_is_named_not_a_damaged_file(tmp_path, bpe_dir, capsys, monkeypatch):
    """--device for a GPU this machine lacks: one line about the device (it was reported as a damaged
    model.safetensors, "train the run again")."""
    from miniglm.cli import main

    from .conftest import make_chat_run

    run = make_chat_run(tmp_path, bpe_dir, block_size=32, n_layer=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "t.txt").write_text("话说天下大势，分久必合，合久必分。", encoding="utf-8")
    for argv in (["generate", "--run", str(run), "--prompt", "你好", "--device", "cuda:7"],
                 ["eval", "ppl", "--run", str(run), "--text", str(tmp_path / "t.txt"), "--device", "cuda"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU" in err[0] and "damaged" not in err[0], err
