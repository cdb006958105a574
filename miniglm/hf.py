"""Hugging Face causal LMs trained by miniglm's own loop: the model families of seed 002, a thin wrapper
that gives train.py what it uses of a MiniGLM, LoRA through PEFT, and HF-format checkpoints.

A family says how its models expect SFT data (template, padding side), where LoRA goes, and what ends
an answer. The run layout is MiniGLM's; inside RUN/ckpt and RUN/best the weights are the HF model's
save_pretrained (full fine-tune) or the PEFT adapter (LoRA), beside state.json and optim.pt.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from miniglm.checkpoint import Chat, save_chat, write_state
from miniglm.fileio import UserError, atomic_dir, write_with
from miniglm.hf_weights import check_model_ref
from miniglm.sft.templates import IGNORE, end_of_turn_ids


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # the chat template of miniglm/sft/templates.py its SFT data is rendered with
    train_padding: str  # "left" (seed 002: BLOOMZ, GPT, OPT) or "right"
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool = False  # GPT-2's Conv1D keeps its weight as (in, out)
    remote_code: bool = False  # the model ships its own modelling code (trust_remote_code)
    end_tokens: tuple[str, ...] = ()  # tokens that also end an answer, beside the template's
    # (generation pads left for every family: a decoder-only model continues the right end)


FAMILIES = {f.name: f for f in [
    Family("bloom", "plain", "left", ("query_key_value",)),
    Family("gpt2", "plain", "left", ("c_attn",), fan_in_fan_out=True),
    # uer/gpt2-chinese-*: GPT-2 weights with a BertTokenizer (no EOS: [SEP] ends a text; decoding
    # puts spaces between characters, which HFTokenizer takes out again)
    Family("gpt2-chinese", "plain", "left", ("c_attn",), fan_in_fan_out=True, end_tokens=("[SEP]",)),
    Family("opt", "plain", "left", ("q_proj", "v_proj")),
    Family("llama", "alpaca", "right", ("q_proj", "v_proj")),  # Chinese-LLaMA/Alpaca
    Family("qwen2", "chatml", "right", ("q_proj", "v_proj"), end_tokens=("<|im_end|>", "<|endoftext|>")),
    Family("chatglm", "chatglm", "right", ("query_key_value",), remote_code=True, end_tokens=("<eop>",)),
    Family("chatglm2", "chatglm2", "right", ("query_key_value",), remote_code=True),
    Family("glm4", "hf", "right", ("q_proj", "v_proj"), end_tokens=("<|user|>", "<|observation|>", "<|endoftext|>")),
]}
MODEL_TYPES = {"bloom": "bloom", "gpt2": "gpt2", "opt": "opt", "llama": "llama", "qwen2": "qwen2",
               "glm": "glm4", "glm4": "glm4"}
REMOTE_CODE_HINT = ("ChatGLM-6B's own modelling code was written for transformers 4.x and may not run on "
                    "transformers 5; GLM-4 (THUDM/glm-4-9b-chat-hf) and Qwen run natively")


def quiet() -> None:
    """One clear line on failure and no progress bars: not the hub client's retries and bars."""
    from transformers.utils import logging as hf_logging  # lazy: start-up time

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


@contextmanager
def peft_quiet():
    """peft 0.21 asks transformers 5 a deprecated question (is_gradient_checkpointing): not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def read_hf_config(ref: str | Path) -> dict:
    """config.json of a model name or folder, as a dict: no model class and no remote code needed."""
    from transformers import PretrainedConfig  # lazy: start-up time

    quiet()
    check_model_ref(ref)
    try:
        config, _ = PretrainedConfig.get_config_dict(str(ref))
    except Exception as e:
        raise UserError(f"{ref}: cannot read a Hugging Face config.json ({type(e).__name__}); offline, "
                        "give the path of a local model folder") from None
    return config


def _bert_tokenizer(tokenizer) -> bool:
    inner = getattr(tokenizer, "tok", tokenizer)  # miniglm's HFTokenizer or a transformers tokenizer
    return type(inner).__name__.startswith("Bert")


def detect_family(config: dict, tokenizer=None, template: str = "auto") -> Family:
    """The family of a model from config.model_type (+ a BertTokenizer: gpt2-chinese). An unknown
    architecture fine-tunes with an explicit template and LoRA on all its linear layers."""
    kind = config.get("model_type")
    if kind == "gpt2" and (str(config.get("tokenizer_class", "")).startswith("Bert") or _bert_tokenizer(tokenizer)):
        return FAMILIES["gpt2-chinese"]
    if kind == "chatglm":  # ChatGLM-6B has 2D positions; ChatGLM2/3 share the model type
        return FAMILIES["chatglm" if "position_encoding_2d" in config else "chatglm2"]
    if kind in MODEL_TYPES:
        return FAMILIES[MODEL_TYPES[kind]]
    if template == "auto":
        raise UserError(f"model type '{kind}' is none of the known families ({', '.join(FAMILIES)}); "
                        "pass --template to fine-tune it anyway")
    return Family(str(kind), template, "right", ("all-linear",), remote_code="auto_map" in config)


def block_size_of(config: dict) -> int:
    for key in ("n_positions", "max_position_embeddings", "seq_length", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 2048  # BLOOM (ALiBi) has no position limit; it was trained on 2048 tokens


@dataclass
class HFInfo:
    """What train.py reads of model.config (a MiniGLM ModelConfig has the same fields)."""

    vocab_size: int
    block_size: int
    family: str
    model_type: str

    def to_dict(self) -> dict:
        return asdict(self)


class HFCausalLM(torch.nn.Module):
    """An AutoModelForCausalLM behind MiniGLM's forward: (idx, targets) -> (logits, loss), where targets
    are already shifted (targets[:, t] is the token after idx[:, t]) and -100 is ignored."""

    def __init__(self, model: torch.nn.Module, family: Family, trust_remote_code: bool = False):
        super().__init__()
        self.model = model  # a PreTrainedModel, or a PeftModel around one after add_lora
        self.family, self.trust_remote_code = family, trust_remote_code
        config = model.config.to_dict()
        head = model.get_output_embeddings()  # None in some remote-code models
        vocab = head.weight.shape[0] if head is not None else config.get("padded_vocab_size", config["vocab_size"])
        self.config = HFInfo(vocab, block_size_of(config), family.name, str(config.get("model_type")))
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if position_ids is not None:  # packed rows: HF attention would cross the records' borders
            raise UserError("packed SFT data is for MiniGLM runs; prepare it without --pack for a Hugging Face model")
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self.takes_positions:  # left padding: positions count real tokens, as in generate()
                kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=idx, use_cache=False, **kwargs).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        """What state.json records, so a checkpoint loads without guessing."""
        return {"family": self.family.name, "trust_remote_code": self.trust_remote_code,
                "lora": self.is_lora()}

    def is_lora(self) -> bool:
        from peft import PeftModel  # lazy: start-up time

        return isinstance(self.model, PeftModel)

    def add_lora(self, r: int, alpha: int, dropout: float, targets: str = "auto",
                 resume_from: Path | None = None) -> None:
        """Wrap the model in a PEFT LoRA model (only the adapters train); or load a checkpoint's adapter
        to train on."""
        from peft import LoraConfig, PeftModel, get_peft_model  # lazy: start-up time

        if resume_from is not None:
            with peft_quiet():
                self.model = PeftModel.from_pretrained(self.model, str(resume_from), is_trainable=True)
            return
        names = list(self.family.lora_targets) if targets in ("", "auto") else [t.strip() for t in targets.split(",")]
        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules="all-linear" if names == ["all-linear"] else names,
                            fan_in_fan_out=self.family.fan_in_fan_out)
        try:
            with peft_quiet():
                self.model = get_peft_model(self.model, config)
        except ValueError as e:  # target modules not found
            raise UserError(f"LoRA on a {self.family.name} model: {e}; set lora_targets") from None

    def merged(self) -> HFCausalLM:
        """Fold a LoRA adapter into the weights (merge_and_unload): a plain transformers model again."""
        if self.is_lora():
            self.model = self.model.merge_and_unload()
        return self


# --- loading -------------------------------------------------------------------------------------
def _from_pretrained(ref: str | Path, family: Family, trust_remote_code: bool, dtype: torch.dtype):
    from transformers import AutoModel, AutoModelForCausalLM  # lazy: start-up time

    if family.remote_code and not trust_remote_code:
        raise UserError(f"{ref}: a {family.name} model runs its own code from the model repository: pass "
                        f"--trust-remote-code (or --set trust_remote_code=true) if you trust it. {REMOTE_CODE_HINT}")
    quiet()
    try:
        return AutoModelForCausalLM.from_pretrained(str(ref), dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        if trust_remote_code:  # ChatGLM-6B registers AutoModel only (the seed loads it with AutoModel)
            try:
                return AutoModel.from_pretrained(str(ref), dtype=dtype, trust_remote_code=True)
            except Exception as e2:
                raise UserError(f"{ref}: its remote modelling code failed on this transformers "
                                f"({type(e2).__name__}: {str(e2).splitlines()[0][:200]}). {REMOTE_CODE_HINT}") from None
        raise UserError(f"{ref}: cannot load it with AutoModelForCausalLM "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_model(ref: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               tokenizer=None, template: str = "auto") -> HFCausalLM:
    """An HF model by name or folder. A run fine-tuned by miniglm opens with miniglm.runs.load_model."""
    family = detect_family(read_hf_config(ref), tokenizer, template)
    return HFCausalLM(_from_pretrained(ref, family, trust_remote_code, dtype), family, trust_remote_code)


def load_run_model(ckpt: Path, state: dict, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """The model of an HF run's checkpoint (state.json read by miniglm.runs), its LoRA adapter merged in."""
    info = state["hf"]
    family = FAMILIES.get(info.get("family")) or detect_family(read_hf_config(state["base_model"]), None, "hf")
    trust = bool(info.get("trust_remote_code", False))
    if not (ckpt / "adapter_config.json").exists():
        return HFCausalLM(_from_pretrained(ckpt, family, trust, dtype), family, trust)
    from peft import PeftModel  # lazy: start-up time

    base = _from_pretrained(state["base_model"], family, trust, dtype)
    try:
        with peft_quiet():
            base = PeftModel.from_pretrained(base, str(ckpt))
    except Exception as e:  # PEFT raises what safetensors and torch raise for a torn adapter
        detail = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"{ckpt}: the LoRA adapter is damaged ({type(e).__name__}: {detail}); "
                        "restore it, or train the run again") from None
    return HFCausalLM(base, family, trust).merged()


def save_checkpoint(path: str | Path, model: HFCausalLM, state: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """The HF model's save_pretrained (full: config.json + model.safetensors; LoRA: adapter_config.json
    + adapter_model.safetensors), state.json and optim.pt, written under a temporary name."""
    with atomic_dir(path, replace=True) as tmp:  # RUN/ckpt, RUN/best: the run was checked as a whole
        write_with(tmp, lambda p: model.model.save_pretrained(str(p), safe_serialization=True))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        write_state(tmp, {**state, "hf": model.describe()}, optimizer)


def merge_run(model: HFCausalLM, tok, state: dict, ckpt: Path, chat: Chat | None, out_dir: str | Path) -> Path:
    """An HF run's merged model (miniglm.runs.load_model) -> a plain transformers folder, tokenizer beside
    it, that is also a run miniglm loads (state.json, chat.json: written by miniglm.checkpoint)."""
    with atomic_dir(out_dir) as tmp:
        write_with(tmp, lambda p: save_with_eos(model.model, answer_end_ids(model, tok, chat), p))
        tok.save(tmp)
        write_state(tmp, {"step": state.get("step", 0), "stage": state.get("stage"),
                          "base_model": state.get("base_model"), "merged_from": str(ckpt.resolve()),
                          "hf": model.describe()})
        if chat is not None:
            save_chat(tmp, *chat)
    return Path(out_dir)


def answer_end_ids(model: HFCausalLM, tok, chat: Chat | None) -> list[int]:
    """Every token that ends an answer: the model's own EOS ids, the family's end tokens (Qwen's
    <|im_end|>) and the end of turn of the template the run was tuned with (chat.json)."""
    own = model.model.generation_config.eos_token_id
    own = own if isinstance(own, list) else [own]
    family = [tok.token_id(t) for t in model.family.end_tokens]
    turn = end_of_turn_ids(chat[0], tok, chat[1]) if chat else []
    return [i for i in dict.fromkeys([tok.eot_id, *own, *family, *turn]) if i is not None]


def save_with_eos(model: torch.nn.Module, ids: list[int], path: Path) -> None:
    """save_pretrained with EOS set to ids in what is written; the model's own configs are put back after."""
    before = model.config.eos_token_id, model.generation_config.eos_token_id
    set_eos_ids(model, ids)
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    finally:
        model.config.eos_token_id, model.generation_config.eos_token_id = before


def set_eos_ids(model: torch.nn.Module, ids: list[int]) -> None:
    """EOS as a list in config.json and generation_config.json, so that transformers' generate and
    vLLM stop at every one of them."""
    eos = ids if len(ids) > 1 else ids[0]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
