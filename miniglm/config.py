"""Training configuration: one dataclass, TOML files, and `--set key=value` overrides (no exec).

A config file has the training keys at the top level and the model in a [model] table:

    stage = "pretrain"
    data = "runs/demo/data"
    max_steps = 600
    [model]
    n_layer = 4
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from miniglm.devices import check_device_name
from miniglm.fileio import UserError, read_text, write_text
from miniglm.model import KINDS, ModelConfig


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    stage: str = "pretrain"  # "pretrain": token shards; "sft": rendered SFT records (ids + labels)
    data: str = ""  # shard folder (pretrain) or folder / jsonl written by `sft prepare` (sft)
    init_from: str = "scratch"  # "scratch", a run folder, or a Hugging Face GPT-2 / Llama model
    # hf: init_from is a Hugging Face model (name, folder, or an HF run) trained as it is (miniglm.hf),
    # not converted into a MiniGLM; `miniglm finetune` sets it
    hf: bool = False
    trust_remote_code: bool = False  # hf: run the model repository's own code (ChatGLM-6B)
    tokenizer: str = ""  # default: the tokenizer named by the data
    # batch: batch_size sequences per micro-step, grad_accum micro-steps, on every process
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    # AdamW with a cosine schedule after a linear warm-up
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 0  # 0: save at every eval
    log_every: int = 10
    seed: int = 1337
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16
    compile: bool | str = "auto"  # torch.compile the model: true | false | auto (on CUDA, not on CPU)
    threads: int = 0  # CPU threads for torch; 0: torch's default
    # LoRA (PEFT): lora_r > 0 trains adapters only
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "auto"  # module names, comma-separated; auto: q_proj,v_proj (llama), c_attn (gpt2), HF: family
    lora_embeddings: bool = True  # MiniGLM: also train the token embeddings: new role/end tokens are learned there
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        """Range checks, before any work: each error names the key, the value and the valid range."""
        if self.stage not in ("pretrain", "sft"):
            raise UserError(f"stage must be 'pretrain' or 'sft', got '{self.stage}'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be auto, float32 or bfloat16, got '{self.dtype}'")
        check_device_name(self.device)
        for key, low in (("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("eval_every", 1),
                         ("eval_batches", 1), ("log_every", 1), ("save_every", 0), ("warmup_steps", 0),
                         ("threads", 0), ("lora_r", 0), ("lora_alpha", 1)):
            if getattr(self, key) < low:
                raise UserError(f"{key} must be at least {low}, got {getattr(self, key)}")
        if not self.lr > 0:
            raise UserError(f"lr must be greater than 0, got {self.lr}")
        for key in ("min_lr", "weight_decay", "grad_clip"):
            if not getattr(self, key) >= 0:  # written so that nan fails too
                raise UserError(f"{key} must be at least 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2", "lora_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        for prefix, obj in (("", self), ("model.", self.model)):  # inf passes "> 0" and trains a NaN model
            for f in fields(obj):
                value = getattr(obj, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(f"{prefix}{f.name} must be a finite number, got {value}")


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, quoted string, list), or else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


BOOL_OR_AUTO = {"compile"}  # keys that take true, false or "auto"


def _apply(target: Any, key: str, value: Any, where: str) -> None:
    names = {f.name: f for f in fields(target)}
    if key not in names or key == "model":
        raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(n for n in names if n != 'model'))})")
    current = getattr(target, key)
    if key in BOOL_OR_AUTO:
        if value is not True and value is not False and value != "auto":
            raise UserError(f"{where}: '{key}' must be true, false or \"auto\", got {value!r}")
        setattr(target, key, value)
        return
    if isinstance(current, bool) and not isinstance(value, bool):
        raise UserError(f"{where}: '{key}' must be true or false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(current) is not type(value):
        raise UserError(f"{where}: '{key}' must be {KINDS[type(current)]}, got {value!r}")
    setattr(target, key, value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    cfg = TrainConfig()
    model: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(read_text(path, encoding_flag=False))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        model = raw.pop("model", {})
        if not isinstance(model, dict):
            raise UserError(f"{path}: 'model' must be a [model] table")
        for k, v in raw.items():
            _apply(cfg, k, v, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set lr=3e-4 or --set model.n_layer=4")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("model."):
            model[key[len("model."):]] = _parse_value(text.strip())
        else:
            _apply(cfg, key, _parse_value(text.strip()), f"--set {item}")
    base = {f.name: f.default for f in fields(ModelConfig)}  # raw defaults: 0 still means "derive it"
    for k in model:
        if k not in base:
            raise UserError(f"unknown model key '{k}' (known: {', '.join(base)})")
    try:
        cfg.model = ModelConfig.from_dict({**base, **model})
        cfg.model_keys = frozenset(model)  # the model keys the file and --set gave: checked against a loaded model
    except ValueError as e:  # ModelConfig.validate names the key
        raise UserError(f"model.{e}") from None
    cfg.validate()
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def to_toml(cfg: TrainConfig) -> str:
    lines = [f"{f.name} = {_toml_value(getattr(cfg, f.name))}" for f in fields(cfg) if f.name != "model"]
    if not cfg.hf:  # an HF model's architecture is its own config.json
        lines += ["", "[model]"] + [f"{k} = {_toml_value(v)}" for k, v in cfg.model.to_dict().items()]
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    write_text(path, to_toml(cfg))
