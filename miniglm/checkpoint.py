"""Writing checkpoints and runs: safetensors weights, config.json, state.json (step, sampler and RNG
states), the optimizer state, and the run's tokenizer and chat.json. Each checkpoint folder is written
under a temporary name and renamed into place. Opening them again is miniglm.runs's job.

    RUN/ckpt/   the last checkpoint (with optimizer state, for exact resume)
    RUN/best/   the weights with the best val loss so far
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_model

from miniglm.fileio import atomic_dir, write_json, write_with
from miniglm.model import MiniGLM, ModelConfig
from miniglm.sft.templates import TemplateOptions
from miniglm.tokenizer import Tokenizer, identity


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


def save_run(out_dir: str | Path, model: MiniGLM, state: dict, tokenizer: Tokenizer | None = None,
             chat: tuple[str, TemplateOptions] | None = None) -> Path:
    """A whole MiniGLM run folder that every command opens: ckpt/ (state.json records the tokenizer's
    identity), tokenizer/ and, for a chat model, chat.json naming its template. For importers and merge."""
    out = Path(out_dir)
    if tokenizer is not None:
        state = {**state, "tokenizer_identity": identity(tokenizer)}
    with atomic_dir(out) as tmp:  # one set: never a new checkpoint beside an old tokenizer
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        save_checkpoint(tmp / "ckpt", model, model.config, state)
        if chat is not None:
            write_json(tmp / "chat.json", {"template": chat[0], "template_options": asdict(chat[1])})
    return out
