"""One rule for the device of every command, and leaving a model that was handed over as it was.

`--device auto|cpu|cuda|cuda:N` (or `device = ...` in a config): auto is CUDA when torch sees a GPU;
"cuda" is this process's GPU (LOCAL_RANK under torchrun). Code that is handed a model (decoding, probing,
evaluation, export, merge) works on the model's own device and never moves it, casts it or flips its
train/eval flag: a training loop that probes its model must find it as it left it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from miniglm.fileio import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> str:
    """The name's form alone (no hardware looked at): for config validation before any work."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"device must be {DEVICE_CHOICES}, got '{name}'")
    return name


def resolve_device(name: str = "auto") -> str:
    """"auto" / "cpu" / "cuda" / "cuda:N" -> the device to use, "cpu" or "cuda:N" (an index always, so
    what a run records is what it used); a GPU that is not there is one line."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise UserError(f"device '{name}': torch sees no CUDA GPU here (torch {torch.__version__}); "
                        "choose device cpu or auto")
    count = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", 0))
    index = int(name.split(":")[1]) if ":" in name else local
    if ":" not in name and local >= count:
        procs = os.environ.get("LOCAL_WORLD_SIZE", local + 1)
        raise UserError(f"torchrun started {procs} processes on this machine but it has {count} GPU"
                        f"{'s' if count != 1 else ''}: use --nproc_per_node {count} or fewer")
    if index >= count:
        raise UserError(f"device '{name}': this machine has {count} GPU{'s' if count != 1 else ''} "
                        f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return f"cuda:{index}"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the first parameter or buffer; CPU for a model of neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block; every module's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training
