import pytest
import torch

from miniglm.checkpoint import save_checkpoint
from miniglm.cli import main
from miniglm.export import from_hf
from miniglm.model import MiniGLM, ModelConfig


def tiny(style: str, **kw) -> MiniGLM:
    torch.manual_seed(0)
    return MiniGLM(ModelConfig(style=style, vocab_size=120, block_size=32, n_layer=2, n_head=4,
                               n_kv_head=2 if style == "llama" else 0, n_embd=32, **kw)).eval()


@pytest.mark.parametrize("style,tied", [("gpt2", True), ("llama", True), ("llama", False)])
def test_export_to_transformers_keeps_logits(tmp_path, style, tied, bpe_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miniglm.tokenizer import load_tokenizer

    model = tiny(style, tie_embeddings=tied)
    with torch.no_grad():  # non-zero norm weights so a mix-up would show
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 0})
    load_tokenizer(bpe_dir).save(tmp_path / "run" / "tokenizer")
    assert main(["export", "--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx)[0], atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).eos_token == "<|endoftext|>"
    back = from_hf(tmp_path / "hf").eval()  # and back again
    with torch.no_grad():
        assert torch.allclose(back(idx)[0], model(idx)[0], atol=1e-5)


def test_from_hf_refuses_other_architectures(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from miniglm.fileio import UserError

    OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)).save_pretrained(
        str(tmp_path / "opt"))
    with pytest.raises(UserError, match="not a MiniGLM architecture"):
        from_hf(tmp_path / "opt")
