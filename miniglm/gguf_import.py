"""Import a llama-architecture GGUF (llama.cpp's file) as a MiniGLM run.

    RUN/ckpt/       the weights, dequantized to fp32 (safetensors), and config.json from the metadata
    RUN/tokenizer/  tokenizer.json rebuilt from tokenizer.ggml.* (byte-level BPE, its pre-tokenizer),
                    tokenizer_config.json with the special tokens and the model's own chat_template
    RUN/chat.json   template "hf": prompts render with that chat_template, as the model was trained

The GGUF stores q/k rows permuted for llama.cpp's interleaved RoPE (export.permute_for_gguf); they
are put back in HF/MiniGLM's rotate-halves order here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from miniglm.checkpoint import load_weights, save_run
from miniglm.fileio import UserError
from miniglm.gguf_tokenizer import write_gguf_tokenizer
from miniglm.model import MiniGLM, ModelConfig

GGUF_MAGIC = b"GGUF"
DEFAULT_CONTEXT = 2048  # an 8k fp32 KV cache of even a 135M model is ~377 MB per row
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF names -> MiniGLM (= HF Llama) names; per layer under blk.N. / model.layers.N.
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def unpermute_from_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of export.permute_for_gguf: llama.cpp's interleaved q/k rows back to rotate-halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf  # lazy: start-up time

    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _decimal(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def gguf_config(reader, path: Path, max_context: int = DEFAULT_CONTEXT) -> tuple[ModelConfig, int]:
    """The MiniGLM config a llama GGUF describes, and the context it was trained with."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture '{arch}' is not supported (miniglm imports llama GGUFs)")
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UserError(f"{path}: RoPE scaling '{scaling}' is not supported")

    def need(key: str):
        value = _meta(reader, f"llama.{key}")
        if value is None:
            raise UserError(f"{path}: metadata llama.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    trained_context = int(need("context_length"))
    vocab = _meta(reader, "llama.vocab_size") or len(_meta(reader, "tokenizer.ggml.tokens") or [])
    config = ModelConfig(style="llama", vocab_size=int(vocab), block_size=min(trained_context, max_context),
                         n_layer=int(need("block_count")), n_head=n_head,
                         n_kv_head=int(_meta(reader, "llama.attention.head_count_kv", n_head)), n_embd=n_embd,
                         intermediate_size=int(need("feed_forward_length")), dropout=0.0,
                         tie_embeddings="output.weight" not in names,
                         rope_theta=_decimal(_meta(reader, "llama.rope.freq_base", 10000.0)),
                         norm_eps=_decimal(need("attention.layer_norm_rms_epsilon")))
    rope_dims = int(_meta(reader, "llama.rope.dimension_count", config.head_dim))
    if rope_dims != config.head_dim:
        raise UserError(f"{path}: partial RoPE ({rope_dims} of {config.head_dim} head dimensions) is not supported")
    return config, trained_context


def gguf_state_dict(reader, path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its MiniGLM name, q/k rows un-permuted."""
    import gguf  # lazy: start-up time

    bad = [t for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    if bad:
        raise UserError(f"{path}: tensor {bad[0].name} has type {bad[0].tensor_type.name}; "
                        f"miniglm imports {', '.join(SUPPORTED_TYPES)}")
    sd = {}
    for t in reader.tensors:
        name = GLOBAL_NAMES.get(t.name)
        parts = t.name.split(".")
        if name is None and len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
        if name is None:
            raise UserError(f"{path}: tensor {t.name} has no place in a llama-style MiniGLM")
        # np.array copies: the file is mapped read-only
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if parts[-2:] == ["attn_q", "weight"]:
            w = unpermute_from_gguf(w, config.n_head)
        elif parts[-2:] == ["attn_k", "weight"]:
            w = unpermute_from_gguf(w, config.n_kv_head)
        sd[name] = w
    return sd


def import_gguf(gguf_path: str | Path, out_dir: str | Path, max_context: int = DEFAULT_CONTEXT,
                note: Callable[[str], None] | None = None) -> tuple[MiniGLM, dict]:
    """A llama GGUF -> a MiniGLM run folder (ckpt/, tokenizer/, chat.json when it has a template), written
    as one set by checkpoint.save_run. Returns the model and a summary (context, pre-tokenizer, template)
    for the CLI to print."""
    path = Path(gguf_path)
    reader = _open(path)
    if max_context < 1:
        raise UserError("--max-context must be positive")
    config, trained_context = gguf_config(reader, path, max_context)
    sd = gguf_state_dict(reader, path, config)
    model = MiniGLM(config)
    load_weights(model, sd, f"{path}: tensors do not make a llama-style MiniGLM",
                 skip_missing=("lm_head.weight",) if config.tie_embeddings else ())
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer is rebuilt here, then goes into the run
        tok_info = write_gguf_tokenizer(reader, path, Path(scratch), config.block_size, note)
        chat = ("hf", {}) if tok_info["chat_template"] else None  # the model's own chat_template
        save_run(out_dir, model, {"step": 0, "imported_from": str(path)}, Path(scratch), chat)
    return model, {"trained_context": trained_context, "context": config.block_size, **tok_info}
