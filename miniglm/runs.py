"""Opening a run: the one place every command finds a checkpoint, reads its config.json, state.json and
chat.json, loads its model and its tokenizer, and checks each file on the way.

    RUN/ckpt/       the last checkpoint: config.json, state.json, model.safetensors (or a LoRA adapter)
    RUN/best/       the weights with the best val loss
    RUN/tokenizer/  the tokenizer the run was trained with (state.json records its identity)
    RUN/chat.json   the chat template of a fine-tuned run

A damaged file is one UserError that names it ("FILE is damaged (why); what to do"), never a
traceback; a tokenizer that is not the one the run (or the data) was made with is refused, naming both.
Writing a run is checkpoint.py's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors

from miniglm import lora
from miniglm.fileio import UserError, read_log, recover_dir
from miniglm.hf import load_run_model
from miniglm.hf_weights import from_hf
from miniglm.model import MiniGLM, ModelConfig
from miniglm.sft.templates import TEMPLATES, TemplateOptions
from miniglm.tokenizer import Tokenizer, identity, load_tokenizer

RESTORE = "restore it from a copy, or train the run again"
RESUME_KEYS = ("step", "best_val_loss", "sampler", "rng")  # what an exact resume needs of state.json


def damaged(path: Path, why: str, fix: str = RESTORE) -> UserError:
    return UserError(f"{path} is damaged ({why}); {fix}")


def read_json_object(path: Path, fix: str = RESTORE) -> dict:
    """A JSON object file of a run; empty, truncated or not an object is a UserError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8 text", fix) from None
    if not text.strip():
        raise damaged(path, "the file is empty", fix)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON: {e.msg} at line {e.lineno}", fix) from None
    if not isinstance(obj, dict):
        raise damaged(path, f"a JSON {type(obj).__name__}, not an object", fix)
    return obj


# --- finding the checkpoint ----------------------------------------------------------------------
def _is_checkpoint(folder: Path) -> bool:
    """state.json beside the model's config.json, or beside an adapter alone (an HF LoRA checkpoint)."""
    models = ("config.json", "adapter_config.json")
    return (folder / "state.json").exists() and any((folder / n).exists() for n in models)


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A run folder (its ckpt/) or a checkpoint folder itself (ckpt/, best/, a merged run)."""
    p = Path(run_or_ckpt)
    recover_dir(p / "ckpt")
    for candidate in (p, p / "ckpt"):
        if _is_checkpoint(candidate):
            return candidate
    raise UserError(f"{p}: no checkpoint here (expected config.json and state.json, or a ckpt/ folder)")


def is_run(ref: str | Path) -> bool:
    p = Path(ref)
    return any(_is_checkpoint(c) for c in (p, p / "ckpt"))


def run_dir_of(ckpt: Path) -> Path:
    """The run folder of a checkpoint: it holds tokenizer/ and chat.json."""
    return ckpt.parent if ckpt.name in ("ckpt", "best") else ckpt


@dataclass
class Run:
    ckpt: Path  # the checkpoint folder
    dir: Path  # the run folder
    state: dict  # state.json, checked

    @property
    def hf(self) -> bool:
        """A Hugging Face model fine-tuned by `miniglm finetune`, loaded through miniglm.hf."""
        return "hf" in self.state

    @property
    def name(self) -> str:
        return self.dir.name


def open_run(ref: str | Path | Run) -> Run:
    if isinstance(ref, Run):
        return ref
    ckpt = find_checkpoint(ref)
    return Run(ckpt, run_dir_of(ckpt), read_state(ckpt))


def run_inputs(ref: str | Path | None) -> list[Path]:
    """What a command reading the run (or checkpoint) `ref` reads, for the output check (fileio.check_output):
    its checkpoint, best/, tokenizer/, chat.json, config.toml, metrics.jsonl and RUN/data, and the base
    checkpoint a LoRA adapter is applied to. Not the run folder as a whole: outputs may go inside it
    (RUN/eval, an export in RUN/hf), but an output that is the run or holds it would delete these.
    Anything that is not a run is returned as it is (the command reports it)."""
    if ref is None:
        return []
    p = Path(ref)
    if not is_run(p):
        return [p]
    ckpt = find_checkpoint(p)
    run = run_dir_of(ckpt)
    if ckpt == run:  # a checkpoint folder that is its own run (a merged transformers folder): its files
        found = [f for f in ckpt.iterdir() if f.is_file() and not f.name.startswith(".")]
    else:
        found = [ckpt, *(run / n for n in ("ckpt", "best"))]
    found += [run / n for n in ("tokenizer", "chat.json", "config.toml", "metrics.jsonl", "data")]
    try:
        base = read_state(ckpt).get("base_model")
    except UserError:
        base = None
    if isinstance(base, str) and Path(base).exists():
        found.append(Path(base))
    return found


# --- the small JSON files ------------------------------------------------------------------------
def read_state(ckpt: Path) -> dict:
    path = ckpt / "state.json"
    state = read_json_object(path)
    if not isinstance(state.get("step", 0), int) or state.get("step", 0) < 0:
        raise damaged(path, f"'step' is {state['step']!r}, not a step number")
    if "hf" in state and not isinstance(state["hf"], dict):
        raise damaged(path, "'hf' is not an object")
    return state


def read_resume_state(ckpt: Path) -> dict:
    """state.json with everything an exact resume reads."""
    state, path = read_state(ckpt), ckpt / "state.json"
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise damaged(path, f"no {', '.join(missing)}", "delete the run's ckpt/ to start over, or restore it")
    if not isinstance(state["sampler"], dict) or not isinstance(state["rng"], dict) or "torch" not in state["rng"]:
        raise damaged(path, "the sampler or RNG state is not what training wrote",
                      "delete the run's ckpt/ to start over, or restore it")
    return state


def read_model_config(ckpt: Path) -> ModelConfig:
    path = ckpt / "config.json"
    if not path.exists():
        raise UserError(f"{path} is missing; {RESTORE}")
    d = read_json_object(path)
    for f in fields(ModelConfig):  # a wrong type fails deep inside torch otherwise
        value = d.get(f.name, f.default)
        ok = isinstance(value, type(f.default)) or (isinstance(f.default, float) and isinstance(value, int))
        if not ok or (isinstance(f.default, bool) != isinstance(value, bool)):
            raise damaged(path, f"'{f.name}' is {value!r}")
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if d.get(name, 1) <= 0:
            raise damaged(path, f"'{name}' is {d[name]}")
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise damaged(path, str(e)) from None


def read_chat(run_dir: str | Path) -> tuple[str, TemplateOptions] | None:
    """The template a run was fine-tuned with and its options, from RUN/chat.json (None: a base run)."""
    path = Path(run_dir) / "chat.json"
    if not path.exists():
        return None
    info = read_json_object(path)
    template, options = info.get("template"), info.get("template_options", {})
    if template not in TEMPLATES:
        raise damaged(path, f"the template {template!r} is none of {', '.join(TEMPLATES)}")
    if not isinstance(options, dict):
        raise damaged(path, "'template_options' is not an object")
    try:
        return template, TemplateOptions(**options)
    except TypeError as e:
        raise damaged(path, f"template_options: {e}") from None


def read_metrics(run: str | Path) -> list[dict]:
    """RUN/metrics.jsonl. Lines are appended as training goes: a run killed mid-line leaves its last line
    torn, which is left out (fileio.read_log); a bad line before it is damage."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path}: no such file; train the run first")
    rows = read_log(path)
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise damaged(path, f"record {i + 1} is not a metrics record", "remove that line")
    return rows


# --- weights -------------------------------------------------------------------------------------
def _load_safetensors(model: torch.nn.Module, path: Path, device: str | torch.device) -> None:
    try:
        load_safetensors(model, str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise damaged(path, f"not a complete safetensors file: {e}") from None
    except RuntimeError as e:  # names or shapes that are not the config's
        detail = " ".join(str(e).split())[:160]
        raise UserError(f"{path} does not match {path.parent / 'config.json'} ({detail}); one of the two is "
                        f"damaged: {RESTORE}") from None


def load_base_model(ckpt: Path, device: str | torch.device = "cpu") -> MiniGLM:
    """The full model of a checkpoint; for an adapter checkpoint, its base model (named in state.json)."""
    state = read_state(ckpt)
    if "hf" in state:
        raise UserError(f"{ckpt}: a Hugging Face model fine-tuned by `miniglm finetune` (hf = true), not a MiniGLM; "
                        "`miniglm merge RUN --out DIR` makes a transformers folder of it")
    config = read_model_config(ckpt)
    if (ckpt / "model.safetensors").exists():
        model = MiniGLM(config)
        _load_safetensors(model, ckpt / "model.safetensors", device)
        return model.to(device)
    base = state.get("base_model")
    if not base:
        raise UserError(f"{ckpt}: neither model.safetensors nor a base_model in state.json")
    model = load_any(base, device)
    if model.config.to_dict() | {"dropout": 0} != config.to_dict() | {"dropout": 0}:
        raise UserError(f"{base} (the base model in {ckpt / 'state.json'}) is not the model the adapter in {ckpt} "
                        "was trained on: their config.json differ")
    return model


def load_adapter_weights(model: MiniGLM, ckpt: Path) -> None:
    """Load a checkpoint's LoRA weights into a model that has the adapter layers."""
    path = ckpt / "adapter.safetensors"
    if not path.exists():
        raise UserError(f"{path} is missing; {RESTORE}")
    try:
        lora.load_adapter_weights(model, path)
    except (SafetensorError, OSError) as e:
        raise damaged(path, f"not a complete safetensors file: {e}") from None
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not fit its base model ({' '.join(str(e).split())[:160]}); {RESTORE}") from None


def _with_adapter(model: MiniGLM, ckpt: Path) -> MiniGLM:
    """Add the adapter the checkpoint describes, load it, and fold it into the weights."""
    path = ckpt / "adapter_config.json"
    config = read_json_object(path)
    try:
        r, alpha, dropout = int(config["r"]), int(config["lora_alpha"]), float(config["lora_dropout"])
        targets = ",".join(config["target_modules"])
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(path, f"no valid {e}" if isinstance(e, KeyError) else str(e)) from None
    lora.add_lora(model, r, alpha, dropout, targets, train_embeddings=bool(config.get("train_embeddings", False)))
    load_adapter_weights(model, ckpt)
    return lora.merge_lora(model)


def load_model(ref: str | Path | Run, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model of a run or checkpoint, any LoRA adapter merged in: a MiniGLM, or for an HF run
    (`miniglm finetune`) miniglm.hf's HFCausalLM."""
    run = open_run(ref)
    if run.hf:
        return load_run_model(run.ckpt, run.state, dtype)
    model = load_base_model(run.ckpt, device)
    if has_adapter(run):
        model = _with_adapter(model, run.ckpt)
    return model


def has_adapter(run: Run) -> bool:
    """A LoRA run: its checkpoint holds an adapter (MiniGLM's adapter.safetensors, PEFT's adapter_config.json)."""
    return (run.ckpt / "adapter.safetensors").exists() or (run.ckpt / "adapter_config.json").exists()


def load_any(ref: str | Path, device: str | torch.device = "cpu") -> MiniGLM:
    """A MiniGLM run or checkpoint folder, or a Hugging Face GPT-2 / Llama model (name or folder)."""
    if is_run(ref):
        return load_model(ref, device)
    return from_hf(ref).to(device)


def load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    path = ckpt / "optim.pt"
    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except Exception as e:  # torch raises many kinds for a torn file
        raise damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                      "delete it to resume with a fresh optimizer state, or restore it") from None


# --- the tokenizer -------------------------------------------------------------------------------
def tokenizer_dir(run: Run) -> Path:
    tok_dir = run.dir / "tokenizer"
    if run.hf and not tok_dir.exists():
        return run.ckpt  # a merged HF run keeps its tokenizer beside the weights, as transformers does
    if not tok_dir.exists():
        raise UserError(f"{run.dir}: no tokenizer/ folder in the run")
    return tok_dir


def describe(ident: dict) -> str:
    return f"{ident.get('vocab_size')} ids, sha256 {str(ident.get('sha256'))[:12]}"


def check_same_tokenizer(have: dict | None, have_where: str, want: dict | None, want_where: str) -> None:
    """Two recorded tokenizer identities (tokenizer.identity) must agree; an unrecorded one is not checked."""
    if not have or not want:
        return
    if (have.get("vocab_size"), have.get("sha256")) != (want.get("vocab_size"), want.get("sha256")):
        raise UserError(f"{have_where} was made with another tokenizer ({describe(have)}) than {want_where} "
                        f"({describe(want)}); use the tokenizer of one with the other")


def load_run_tokenizer(run: str | Path | Run, vocab_size: int | None = None) -> Tokenizer:
    """The run's tokenizer, checked against the identity state.json records and, for a MiniGLM, against
    the model's vocab_size: a token id past the embedding fails mid-generation otherwise."""
    run = open_run(run)
    tok_dir = tokenizer_dir(run)
    trust = bool(run.state.get("hf", {}).get("trust_remote_code", False))
    tok = load_tokenizer(tok_dir, trust)
    recorded = run.state.get("tokenizer_identity")
    if recorded:
        check_same_tokenizer(identity(tok), str(tok_dir), recorded, f"this run ({run.ckpt / 'state.json'})")
    if vocab_size is not None and not run.hf and tok.text_vocab_size > vocab_size:
        raise UserError(f"{tok_dir} has {tok.text_vocab_size} token ids, past the {vocab_size} of the model "
                        f"({run.ckpt / 'config.json'}); this is not the run's tokenizer: put its own back")
    return tok


def tokenizer_identity(run: str | Path | Run) -> dict | None:
    """The identity of the tokenizer a run was trained with: recorded in state.json, else its tokenizer/."""
    run = open_run(run)
    if run.state.get("tokenizer_identity"):
        return run.state["tokenizer_identity"]
    if (run.dir / "tokenizer").exists():
        return identity(load_run_tokenizer(run))
    return None
