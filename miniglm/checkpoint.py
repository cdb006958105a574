"""Checkpoints: safetensors weights, config.json, state.json (step, sampler and RNG states), and the
optimizer state. Each checkpoint folder is written under a temporary name and renamed into place.

    RUN/ckpt/   the last checkpoint (with optimizer state, for exact resume)
    RUN/best/   the weights with the best val loss so far
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from miniglm.fileio import UserError, atomic_dir, recover_dir, write_json, write_with
from miniglm.model import MiniGLM, ModelConfig


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: ModelConfig, state: dict,
                    optimizer: torch.optim.Optimizer | None = None, adapter: dict | None = None) -> None:
    """Write a checkpoint folder. With `adapter` (LoRA), only the adapter weights are saved."""
    with atomic_dir(path, replace=True) as tmp:  # RUN/ckpt, RUN/best: the run was checked as a whole
        if adapter is None:
            write_with(tmp / "model.safetensors", lambda p: save_model(model, str(p)))
        else:
            from safetensors.torch import save_file

            write_with(tmp / "adapter.safetensors", lambda p: save_file(adapter["weights"], str(p)))
            write_json(tmp / "adapter_config.json", adapter["config"])
        write_json(tmp / "config.json", config.to_dict())
        write_json(tmp / "state.json", state)
        if optimizer is not None:
            write_with(tmp / "optim.pt", lambda p: torch.save(optimizer.state_dict(), p))


def _is_checkpoint(folder: Path) -> bool:
    """state.json beside the model's config.json, or beside an adapter alone (an HF LoRA checkpoint)."""
    models = ("config.json", "adapter_config.json")
    return (folder / "state.json").exists() and any((folder / n).exists() for n in models)


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A run folder (its ckpt/) or a checkpoint folder itself."""
    p = Path(run_or_ckpt)
    recover_dir(p / "ckpt")
    for candidate in (p, p / "ckpt"):
        if _is_checkpoint(candidate):
            return candidate
    raise UserError(f"{p}: no checkpoint here (expected config.json and state.json, or a ckpt/ folder)")


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def load_base_model(ckpt: Path, device: str | torch.device = "cpu") -> MiniGLM:
    """The full model of a checkpoint; for an adapter checkpoint, its base model (named in state.json)."""
    if "hf" in read_state(ckpt):
        raise UserError(f"{ckpt}: a Hugging Face model fine-tuned by `miniglm finetune` (hf = true), not a MiniGLM; "
                        "`miniglm merge RUN --out DIR` makes a transformers folder of it")
    config = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    if (ckpt / "model.safetensors").exists():
        model = MiniGLM(config)
        load_model(model, str(ckpt / "model.safetensors"), device=str(device))
        return model.to(device)
    base = read_state(ckpt).get("base_model")
    if not base:
        raise UserError(f"{ckpt}: neither model.safetensors nor a base_model in state.json")
    return load_any(base, device)


def is_run(ref: str | Path) -> bool:
    p = Path(ref)
    return any(_is_checkpoint(c) for c in (p, p / "ckpt"))


def load_any(ref: str | Path, device: str | torch.device = "cpu") -> MiniGLM:
    """A MiniGLM run or checkpoint folder, or a Hugging Face GPT-2 / Llama model (name or folder)."""
    if is_run(ref):
        return load_model_from(ref, device)
    from miniglm.export import from_hf

    return from_hf(ref).to(device)


def load_model_from(run_or_ckpt: str | Path, device: str | torch.device = "cpu") -> MiniGLM:
    """The model of a run or checkpoint, with its LoRA adapter applied if it has one."""
    ckpt = find_checkpoint(run_or_ckpt)
    model = load_base_model(ckpt, device)
    if (ckpt / "adapter.safetensors").exists():
        from miniglm.lora import load_adapter

        model = load_adapter(model, ckpt)
    return model


def load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    path = ckpt / "optim.pt"
    if path.exists():
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
