"""GGUF import on tiny files written here (the real SmolLM2 file: test_smollm2.py)."""

import json

import numpy as np
import pytest
import torch

from miniglm.checkpoint import save_checkpoint
from miniglm.cli import main
from miniglm.fileio import UserError
from miniglm.model import MiniGLM, ModelConfig
from miniglm.runs import load_model as load_model_from
from tests.conftest import SAMPLE_ZH


@pytest.fixture
def tiny_run(tmp_path, bpe_dir):
    """A random llama-style run with grouped-query attention and non-trivial norm weights."""
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_dir)
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4,
                                n_kv_head=2, n_embd=64, rope_theta=50000.0, norm_eps=1e-6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 0})
    tok.save(tmp_path / "run" / "tokenizer")
    return tmp_path / "run"


def _export(run, out, outtype="f32"):
    assert main(["export", "--run", str(run), "--to", "gguf", "--outtype", outtype, "--out", str(out)]) == 0


def test_gguf_round_trip_keeps_logits_and_tokens(tiny_run, tmp_path, bpe_dir):
    from miniglm.sft.templates import render
    from miniglm.tokenizer import load_tokenizer

    _export(tiny_run, tmp_path / "m.gguf")
    assert main(["import-ckpt", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    model, back = load_model_from(tiny_run).eval(), load_model_from(tmp_path / "back").eval()
    assert back.config == model.config  # GQA, rope theta, RMS eps, tied output all from the metadata
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(idx)[0]
        # F32 round trip: the weights come back bit for bit (q/k un-permuted) into the same code, so the logits
        # are equal on one machine (0 here); 1e-6 of their size leaves a few float32 roundings, while a q/k
        # permutation left in place or a swapped tensor moves them by O(their size).
        torch.testing.assert_close(back(idx)[0], want, rtol=0, atol=1e-6 * want.abs().max().item())
    ours, imported = load_tokenizer(bpe_dir), load_tokenizer(tmp_path / "back" / "tokenizer")
    assert imported.encode(SAMPLE_ZH) == ours.encode(SAMPLE_ZH)
    user, end = ours.special("<|user|>"), ours.special("<|end|>")
    assert [imported.token_id("<|user|>"), imported.token_id("<|end|>")] == [user, end]  # specials stay whole
    chat = [{"role": "user", "content": "你好"}]
    assert render("miniglm", chat, imported, True).ids == render("miniglm", chat, ours, True).ids
    assert imported.encode("<|user|>你好<|end|>") == ours.encode("<|user|>你好<|end|>")  # typed: text in both
    assert imported.eot_id == ours.eot_id and imported.decode(ours.encode(SAMPLE_ZH)) == SAMPLE_ZH
    assert not (tmp_path / "back" / "chat.json").exists()  # no chat_template in the file: raw text


def test_import_clamps_context_and_dequantizes(tiny_run, tmp_path):
    import gguf

    _export(tiny_run, tmp_path / "q8.gguf", "q8_0")
    assert main(["import-ckpt", str(tmp_path / "q8.gguf"), "--out", str(tmp_path / "back"), "--max-context", "16"]) == 0
    back = load_model_from(tmp_path / "back")
    assert back.config.block_size == 16
    reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    # exact: the import dequantizes with this very call (and v is not permuted), so the same floats
    assert torch.equal(back.model.layers[1].self_attn.v_proj.weight.detach(), want)
    orig = load_model_from(tiny_run).model.layers[1].self_attn.q_proj.weight.detach()
    got = back.model.layers[1].self_attn.q_proj.weight.detach()
    # Q8_0: within ~0.54 of a step (1/127 of the block's max; its f16 scale adds <= 0.04) of the weight,
    # so < 0.005 of the tensor's max: 1/100 of it is relative and sound; un-permuted rows would be off by O(max).
    assert (got - orig).abs().max() < orig.abs().max() / 100


def test_export_writes_the_recorded_pre_tokenizer(tiny_run, tmp_path):
    import gguf

    _export(tiny_run, tmp_path / "m.gguf")
    assert main(["import-ckpt", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    config = tmp_path / "back" / "tokenizer" / "tokenizer_config.json"
    assert json.loads(config.read_text())["gguf_pre_tokenizer"] == "gpt-2"
    config.write_text(json.dumps({**json.loads(config.read_text()), "gguf_pre_tokenizer": "smollm"}))
    _export(tmp_path / "back", tmp_path / "again.gguf")
    assert gguf.GGUFReader(str(tmp_path / "again.gguf")).fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_pre_tokenizers_split_like_llama_cpp():
    from miniglm.gguf_tokenizer import pre_tokenizer_for

    def split(name, text):
        return [p for p, _ in pre_tokenizer_for(name).pre_tokenize_str(text)]

    assert split("gpt-2", "in 2024") == ["in", "Ġ2024"]
    assert split("smollm", "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]  # each digit alone
    assert split("llama-bpe", "in 2024") == ["in", "Ġ", "202", "4"]  # up to three digits
    assert split("qwen2", "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]


def test_unsupported_type_and_architecture_are_one_line_errors(tiny_run, tmp_path, monkeypatch, capsys):
    import gguf

    import miniglm.export as export

    # a Q5_0 matrix: a type miniglm does not import
    monkeypatch.setattr(export, "_gguf_tensor", lambda a, outtype: (
        (gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q5_0), None, gguf.GGMLQuantizationType.Q5_0)
        if a.ndim == 2 else (a, None, None)))
    _export(tiny_run, tmp_path / "q5.gguf")
    assert main(["import-ckpt", str(tmp_path / "q5.gguf"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miniglm: error:") and "type Q5_0" in err and len(err.strip().splitlines()) == 1

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        from miniglm.gguf_import import import_gguf

        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unpermute_inverts_the_export_permutation():
    from miniglm.export import permute_for_gguf
    from miniglm.gguf_import import unpermute_from_gguf

    w = torch.randn(3 * 16, 8)
    assert torch.equal(unpermute_from_gguf(permute_for_gguf(w, 3), 3), w)
    assert not np.array_equal(permute_for_gguf(w, 3).numpy(), w.numpy())
