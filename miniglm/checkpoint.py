"""Writing checkpoints and runs: the one writer of each file of a run. Each folder is written under a
temporary name and renamed into place. Opening them again is miniglm.runs's job.

    RUN/ckpt/        the last checkpoint: weights (or a LoRA adapter), config.json, state.json (step,
                     sampler and RNG states, the tokenizer's identity) and optim.pt (for exact resume)
    RUN/best/        the weights with the best val loss so far
    RUN/tokenizer/   the tokenizer the run was trained with
    RUN/chat.json    the chat template of a fine-tuned run

Training writes these as it goes (save_checkpoint, save_tokenizer, save_chat); an importer or merge writes
a whole run as one set (save_run). A Hugging Face model's checkpoint (miniglm.hf) saves its own weights
and writes the rest here (write_state, save_chat). load_weights is the check every importer makes that a
set of weights fills a model exactly.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from miniglm.fileio import UserError, atomic_dir, copy_dir, write_json, write_with
from miniglm.model import MiniGLM, ModelConfig
from miniglm.sft.templates import TemplateOptions
from miniglm.tokenizer import Tokenizer, identity, load_tokenizer

# The template a run was fine-tuned with and its options (runs.read_chat); options as a dict are written
# as they are (an SFT meta.json's, a GGUF import's empty ones).
Chat = tuple[str, TemplateOptions | dict]


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str,
                 skip_missing: tuple[str, ...] = (), skip_unexpected: tuple[str, ...] = (),
                 error: type[Exception] = UserError) -> None:
    """Load `weights` into `model` and check that they fill it exactly: a name left over on either side
    (except those ending in skip_missing / skip_unexpected: a tied output layer, a causal-mask buffer) is
    `error` "WHAT (missing [...], unexpected [...])", naming the first three of each."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(skip_missing)]
    unexpected = [k for k in unexpected if not k.endswith(skip_unexpected)]
    if missing or unexpected:
        raise error(f"{what} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def write_state(folder: Path, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """state.json beside a checkpoint's weights, and the optimizer state an exact resume needs."""
    write_json(folder / "state.json", state)
    if optimizer is not None:
        write_with(folder / "optim.pt", lambda p: torch.save(optimizer.state_dict(), p))


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: ModelConfig, state: dict,
                    optimizer: torch.optim.Optimizer | None = None, adapter: dict | None = None) -> None:
    """Write a checkpoint folder. With `adapter` (LoRA), only the adapter weights are saved."""
    with atomic_dir(path, replace=True) as tmp:  # RUN/ckpt, RUN/best: the run was checked as a whole
        if adapter is None:
            write_with(tmp / "model.safetensors", lambda p: save_model(model, str(p)))
        else:
            write_with(tmp / "adapter.safetensors", lambda p: save_file(adapter["weights"], str(p)))
            write_json(tmp / "adapter_config.json", adapter["config"])
        write_json(tmp / "config.json", config.to_dict())
        write_state(tmp, state, optimizer)


def save_tokenizer(run_dir: str | Path, tokenizer: Tokenizer) -> None:
    """RUN/tokenizer/ of a run written over time (training), swapped in whole."""
    with atomic_dir(Path(run_dir) / "tokenizer") as tmp:
        tokenizer.save(tmp)


def save_chat(folder: str | Path, template: str, options: TemplateOptions | dict) -> None:
    """chat.json names the template a run was fine-tuned with, so generate/chat/serve render the same way."""
    options = asdict(options) if isinstance(options, TemplateOptions) else options
    write_json(Path(folder) / "chat.json", {"template": template, "template_options": options})


def save_run(out_dir: str | Path, model: MiniGLM, state: dict, tokenizer: Tokenizer | Path | None = None,
             chat: Chat | None = None) -> Path:
    """A whole MiniGLM run folder that every command opens: ckpt/ (state.json records the tokenizer's
    identity), tokenizer/ and, for a chat model, chat.json naming its template. For importers and merge.
    `tokenizer` as a folder: one an importer rebuilt (a GGUF's), copied as it is."""
    out = Path(out_dir)
    if tokenizer is not None:
        loaded = load_tokenizer(tokenizer) if isinstance(tokenizer, Path) else tokenizer
        state = {**state, "tokenizer_identity": identity(loaded)}
    with atomic_dir(out) as tmp:  # one set: never a new checkpoint beside an old tokenizer
        if isinstance(tokenizer, Path):
            copy_dir(tokenizer, tmp / "tokenizer")
        elif tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        save_checkpoint(tmp / "ckpt", model, model.config, state)
        if chat is not None:
            save_chat(tmp, *chat)
    return out
