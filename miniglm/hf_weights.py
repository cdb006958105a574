"""MiniGLM and transformers' GPT-2 / Llama share their weight names: loading an HF model as a MiniGLM
(`init_from`, `eval` on an HF folder) here, the way back in export.py."""

from __future__ import annotations

from pathlib import Path

import torch

from miniglm.checkpoint import load_weights
from miniglm.fileio import UserError
from miniglm.model import MiniGLM, ModelConfig

# GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear; those four matrices are
# transposed on the way in and out. Nothing else changes.
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# nanoGPT keeps a causal-mask buffer named attn.bias when flash attention is missing; it is no weight.
BUFFERS = (".attn.bias", ".attn.masked_bias")


def check_model_ref(ref: str | Path) -> str:
    """A Hugging Face model name (ORG/NAME) or a local folder. What reads as a local path must exist here:
    a typo in one ('runs/tpyo', './model') would otherwise go to the hub, a long wait offline and then an
    unclear error. It reads as local when it starts like a path, has more than two parts, or its first part
    is a folder here."""
    text = str(ref)
    path = Path(text).expanduser()
    local = (text.startswith(("/", "./", "../", "~")) or len(path.parts) > 2
             or (len(path.parts) == 2 and Path(path.parts[0]).is_dir()))
    if local and not path.exists():
        raise UserError(f"{ref}: no such model folder (a Hugging Face model is named ORG/NAME)")
    return text


def from_hf(path: str | Path) -> MiniGLM:
    """A GPT2LMHeadModel or LlamaForCausalLM (name or folder) as a MiniGLM with the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_ref(path)
    try:
        hf_cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a MiniGLM run nor a loadable Hugging Face model ({type(e).__name__})") from None
    kind = hf_cfg.model_type
    if kind == "gpt2":
        config = ModelConfig(style="gpt2", vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.n_positions,
                             n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd,
                             intermediate_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd, norm_eps=hf_cfg.layer_norm_epsilon,
                             tie_embeddings=hf_cfg.tie_word_embeddings)
    elif kind == "llama":
        rope = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(hf_cfg, "rope_theta", 1e4))
        config = ModelConfig(style="llama", vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.max_position_embeddings,
                             n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads,
                             n_kv_head=hf_cfg.num_key_value_heads, n_embd=hf_cfg.hidden_size,
                             intermediate_size=hf_cfg.intermediate_size, norm_eps=hf_cfg.rms_norm_eps,
                             rope_theta=float(rope), tie_embeddings=hf_cfg.tie_word_embeddings)
    else:
        raise UserError(f"{path}: a '{kind}' model is not a MiniGLM architecture (gpt2 or llama); "
                        "fine-tune it with `miniglm finetune` instead")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    sd = {k: (v.t() if kind == "gpt2" and k.endswith(GPT2_CONV1D) else v) for k, v in hf.state_dict().items()}
    model = MiniGLM(config)
    load_weights(model, sd, f"{path}: weights do not map onto MiniGLM",
                 skip_missing=("lm_head.weight",) if config.tie_embeddings else (), skip_unexpected=BUFFERS)
    return model
