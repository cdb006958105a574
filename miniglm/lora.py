"""LoRA on MiniGLM through PEFT: add adapters, save/load them alone, fold them into the weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from miniglm.model import MiniGLM


def default_targets(style: str) -> list[str]:
    return ["q_proj", "v_proj"] if style == "llama" else ["c_attn"]


def add_lora(model: MiniGLM, r: int, alpha: int, dropout: float = 0.0, targets: str = "auto",
             init: bool = True, train_embeddings: bool = False) -> dict:
    """Inject LoRA layers into the named linear modules; only they stay trainable, and with
    train_embeddings the token embeddings too (tied to the output layer, or the output layer as well):
    tokens a base model never saw, such as the chat roles and the end-of-turn token, can only be
    learned there. Returns the config."""
    from peft import LoraConfig, inject_adapter_in_model

    names = default_targets(model.config.style) if targets in ("", "auto") else [t.strip() for t in targets.split(",")]
    config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names,
              "train_embeddings": train_embeddings}
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                                       init_lora_weights=init), model)
    if train_embeddings:
        model.embeddings.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)  # the same tensor when tied
    return config


def adapter_state(model: MiniGLM) -> dict[str, torch.Tensor]:
    """The adapter's weights, plus any other trainable weights (the embeddings with train_embeddings)."""
    from peft import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(model))
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        if p.requires_grad and "lora_" not in name:
            state[name] = p
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_adapter_weights(model: MiniGLM, path: str | Path) -> None:
    """adapter.safetensors into a model that has the adapter layers (miniglm.runs checks the file)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    set_peft_model_state_dict(model, {k: v for k, v in state.items() if "lora_" in k})
    full = {k: v for k, v in state.items() if "lora_" not in k}
    if full:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in full.items():
                params[k].copy_(v)


def merge_lora(model: MiniGLM) -> MiniGLM:
    """A copy of the model with every adapter folded into its base weight and the plain nn.Linear back;
    the model handed over keeps its adapters, weights, device and flags."""
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
