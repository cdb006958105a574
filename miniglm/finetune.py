"""`miniglm finetune`: fine-tune a Hugging Face model (BLOOMZ, GPT-2, gpt2-chinese, OPT, Chinese-LLaMA,
Qwen, GLM) on SFT data in one command: `sft prepare` with the family's template, tokenizer and padding
side into RUN/data, then `train` (stage sft, hf = true) into RUN. Rerun the same command to resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from miniglm.config import TrainConfig, load_config
from miniglm.fileio import UserError, mark_dir, require_file
from miniglm.sft.formats import column_fields
from miniglm.sft.templates import TemplateOptions

# CPU-sized defaults; every training key can be overridden with --set.
LORA_DEFAULTS = {"lr": 2e-4, "min_lr": 2e-5, "lora_alpha": 16, "lora_dropout": 0.05, "weight_decay": 0.0}
FULL_DEFAULTS = {"lr": 2e-5, "min_lr": 2e-6, "weight_decay": 0.01}
COMMON_DEFAULTS = {"stage": "sft", "hf": True, "batch_size": 4, "grad_accum": 1, "max_steps": 200,
                   "warmup_steps": 10, "eval_every": 50, "eval_batches": 10, "log_every": 5,
                   "lora_embeddings": False}


@dataclass
class FinetuneOptions:
    model: str  # an HF model name (online) or folder
    data: str  # SFT records (JSON records in .json, .jsonl or .txt; .csv)
    out: str  # the run folder
    template: str = "auto"  # auto: the family's
    lora_r: int = 8  # 0: full fine-tune
    max_len: int = 256
    val_fraction: float = 0.05
    seed: int = 1337
    trust_remote_code: bool = False
    columns: str | None = None  # "PROMPT,ANSWER[,HISTORY]" fields (.csv: two columns)
    values: dict[str, str] = field(default_factory=dict)  # renames of those values, e.g. {"1": "正面"}
    template_options: TemplateOptions = field(default_factory=TemplateOptions)
    overrides: list[str] = field(default_factory=list)  # --set key=value, over the defaults below
    encoding: str | None = None  # the data file's, when not UTF-8


def finetune(opts: FinetuneOptions, log=print) -> dict:
    from miniglm.hf import block_size_of, detect_family, read_hf_config
    from miniglm.sft.data import prepare_sft
    from miniglm.tokenizer import load_tokenizer
    from miniglm.train import train

    cfg = training_config(opts)  # a bad --set or a missing file fails before the model loads
    require_file(opts.data, "data file")
    config = read_hf_config(opts.model)
    family = detect_family(config, template=opts.template)  # remote code is refused before it runs
    if family.remote_code and not opts.trust_remote_code:
        from miniglm.hf import REMOTE_CODE_HINT

        raise UserError(f"{opts.model}: a {family.name} model runs its own code from the model repository: pass "
                        f"--trust-remote-code if you trust it. {REMOTE_CODE_HINT}")
    # A local folder loads as every later command loads it (a miniglm export's BPE as miniglm's own, so the
    # data's tokenizer identity is the one training computes); a name goes to the hub's loader.
    tok = load_tokenizer(opts.model if Path(opts.model).is_dir() else f"hf:{opts.model}", opts.trust_remote_code)
    family = detect_family(config, tok, opts.template)
    template = family.template if opts.template == "auto" else opts.template
    # Records longer than the model's context would lose their answer in training's cut: cut the prompt here.
    max_len = min(opts.max_len, block_size_of(config) + 1)
    out = mark_dir(opts.out)  # the run folder: RUN/data, then the checkpoints
    template_opts = column_fields(opts.data, opts.columns, opts.template_options, opts.encoding)
    meta = prepare_sft(opts.data, tok, out / "data", template, max_len, opts.val_fraction, opts.seed,
                       template_opts, padding_side=family.train_padding, columns=opts.columns, values=opts.values,
                       encoding=opts.encoding)
    log(f"{opts.model}: family {family.name}, template {template}, {family.train_padding} padding; "
        f"{meta['train_records']} train / {meta['val_records']} val records, {meta['truncated']} truncated, "
        f"{meta['dropped']} dropped -> {out / 'data'}")
    return train(cfg, log)


def training_config(opts: FinetuneOptions) -> TrainConfig:
    """The family-independent defaults, under the user's --set; checked (load_config) before the slow work."""
    out = Path(opts.out)
    defaults = {**COMMON_DEFAULTS, **(LORA_DEFAULTS if opts.lora_r > 0 else FULL_DEFAULTS),
                "lora_r": opts.lora_r, "seed": opts.seed, "trust_remote_code": opts.trust_remote_code,
                "init_from": opts.model, "data": str(out / "data"), "out_dir": str(out)}
    # Strings as JSON: a TOML basic string; numbers and booleans as JSON are TOML too.
    sets = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in defaults.items()]
    cfg = load_config(None, sets + list(opts.overrides))
    if not cfg.hf:
        raise UserError("finetune trains a Hugging Face model as it is: --set hf=false is not allowed")
    return cfg
