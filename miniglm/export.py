"""Moving weights in and out: import the seed's nanoGPT-style MiniGLM checkpoints (ckpt.pt)."""

from __future__ import annotations

from pathlib import Path

import torch

from miniglm.checkpoint import save_checkpoint
from miniglm.fileio import UserError
from miniglm.model import MiniGLM, ModelConfig
from miniglm.tokenizer import load_tokenizer

# nanoGPT keeps a causal-mask buffer named attn.bias when flash attention is missing; it is no weight.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def import_nanogpt(ckpt_path: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> MiniGLM:
    """A seed checkpoint ({'model_args', 'model', ...}, keys maybe prefixed by torch.compile's
    `_orig_mod.`) -> a gpt2-style MiniGLM run folder."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise UserError(f"{ckpt_path}: no such checkpoint")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{ckpt_path}: cannot read it as a PyTorch checkpoint with weights_only=True ({e})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{ckpt_path}: expected a nanoGPT/MiniGLM checkpoint with 'model_args' and 'model'")
    args = ckpt["model_args"]
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    config = ModelConfig(style="gpt2", vocab_size=args["vocab_size"], block_size=args["block_size"],
                         n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                         bias=args.get("bias", True), dropout=0.0, tie_embeddings=tied)
    model = MiniGLM(config)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{ckpt_path}: weights do not match a gpt2-style MiniGLM "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(out_dir)
    save_checkpoint(out / "ckpt", model, config, {"step": int(ckpt.get("iter_num", 0)),
                                                  "best_val_loss": float(ckpt.get("best_val_loss", float("inf"))),
                                                  "imported_from": str(ckpt_path)})
    if tokenizer:
        load_tokenizer(tokenizer).save(out / "tokenizer")
    return model
