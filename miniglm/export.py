"""Moving weights in and out: import the seed's nanoGPT-style MiniGLM checkpoints (ckpt.pt); export a
run to Hugging Face transformers or to GGUF (llama.cpp). Runs are opened by miniglm.runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from miniglm import runs
from miniglm.checkpoint import load_weights, save_run
from miniglm.fileio import UserError, atomic_dir, atomic_path, write_json, write_with
from miniglm.gguf_import import GLOBAL_NAMES, LAYER_NAMES
from miniglm.gguf_tokenizer import recorded_pre_tokenizer
from miniglm.hf_weights import BUFFERS, GPT2_CONV1D
from miniglm.model import MiniGLM, ModelConfig
from miniglm.sft.templates import TemplateOptions, end_of_turn_ids, jinja_template, render
from miniglm.tokenizer import Tokenizer, load_tokenizer

# What a file that is no PyTorch checkpoint usually is, by its first bytes.
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF",
          b"RIFF": "a RIFF file (WebP, WAV)", b"\x1f\x8b": "a gzip file", b"GGUF": "a GGUF model"}


def _not_a_checkpoint(path: Path, e: Exception | None) -> UserError:
    """One line instead of torch's paragraph (which suggests weights_only=False: not for a file one did not make)."""
    head = path.read_bytes()[:8]
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if not head:
        why = "the file is empty"
    elif kind:
        why = f"it is {kind}"
    elif not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip; old files a pickle
        why = f"it starts with {head!r}"
    else:  # a real torch file that holds more than tensors and plain values, or a torn one
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        detail = next((x for x in lines if "WeightsUnpickler error" in x), lines[-1] if lines else "")
        why = f"{type(e).__name__}: {detail[:160]}"
    return UserError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True ({why})")


def import_nanogpt(ckpt_path: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> MiniGLM:
    """A seed checkpoint ({'model_args', 'model', ...}, keys maybe prefixed by torch.compile's
    `_orig_mod.`) -> a gpt2-style MiniGLM run folder."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise UserError(f"{ckpt_path}: no such checkpoint")
    if ckpt_path.is_dir():
        raise UserError(f"{ckpt_path}: a folder; give the ckpt.pt file")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise _not_a_checkpoint(ckpt_path, e) from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{ckpt_path}: expected a nanoGPT/MiniGLM checkpoint with 'model_args' and 'model'")
    args = ckpt["model_args"]
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(BUFFERS)}
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    try:  # ModelConfig.validate names a bad value
        config = ModelConfig(style="gpt2", vocab_size=args["vocab_size"], block_size=args["block_size"],
                             n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                             bias=args.get("bias", True), dropout=0.0, tie_embeddings=tied)
    except (KeyError, ValueError) as e:
        raise UserError(f"{ckpt_path}: bad model_args ({e}); expected vocab_size, block_size, n_layer, n_head "
                        "and n_embd as positive integers") from None
    model = MiniGLM(config)
    if tied:
        state.pop("lm_head.weight", None)
    load_weights(model, state, f"{ckpt_path}: weights do not match a gpt2-style MiniGLM",
                 skip_missing=("lm_head.weight",) if tied else ())
    tok = load_tokenizer(tokenizer) if tokenizer else None  # a bad name fails before anything is written
    if tok is not None and tok.text_vocab_size > config.vocab_size:
        raise UserError(f"--tokenizer {tokenizer} has {tok.text_vocab_size} token ids, past the {config.vocab_size} of "
                        f"{ckpt_path}; give the tokenizer the checkpoint was trained with")
    save_run(out_dir, model, {"step": int(ckpt.get("iter_num", 0)),  # the run is one set
                              "best_val_loss": float(ckpt.get("best_val_loss", float("inf"))),
                              "imported_from": str(ckpt_path)}, tok)
    return model


# --- Hugging Face transformers ------------------------------------------------------------------


def bos_of(tok: Tokenizer) -> int:
    """BOS in every export (HF and GGUF alike): the tokenizer's own (SmolLM2's <|im_start|>), else
    end-of-text as GPT-2 does."""
    return tok.bos_id if tok.bos_id is not None else tok.eot_id


def hf_config(config: ModelConfig, eos_ids: list[int] | None = None, pad_id: int | None = None,
              bos: int | None = None):
    """The transformers config. eos_ids: end-of-text first, then the chat's end-of-turn tokens; a list
    when there are several (as Llama 3 does), so generate() stops at the end of an answer. bos: bos_of(tok),
    else the first of eos_ids."""
    from transformers import GPT2Config, LlamaConfig  # lazy: start-up time

    eos_ids = eos_ids or [None]
    bos_id, eos_id = eos_ids[0] if bos is None else bos, eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if config.style == "gpt2":
        return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, n_inner=config.intermediate_size,
                          activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=config.tie_embeddings,
                          bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                          architectures=["GPT2LMHeadModel"])
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
                       num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                       max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                       rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
                       bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                       architectures=["LlamaForCausalLM"])


def to_hf_state_dict(model: MiniGLM) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        if model.config.tie_embeddings and k == "lm_head.weight":
            continue
        sd[k] = v.t().contiguous() if model.config.style == "gpt2" and k.endswith(GPT2_CONV1D) else v
    if model.config.style == "gpt2" and not model.config.bias:  # HF GPT-2 always has biases: zeros
        for name, p in list(sd.items()):
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                sd[name[:-len("weight")] + "bias"] = torch.zeros_like(p)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                sd[f"{name}.bias"] = torch.zeros(mod.out_features)
    return sd


def export_hf(run: str | Path, out_dir: str | Path) -> Path:
    """A run folder -> a transformers model folder (config.json, model.safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM  # lazy: start-up time

    opened, chat, tok = _open_for_export(run)
    model = runs.load_model(opened).eval()
    cfg = hf_config(model.config, end_ids(tok, chat) if tok else None, tok.pad_id if tok else None,
                    bos_of(tok) if tok else None)
    hf = AutoModelForCausalLM.from_config(cfg)
    load_weights(hf, to_hf_state_dict(model), "export mapping is incomplete",  # a bug here, not the user's
                 skip_missing=("lm_head.weight", *BUFFERS), error=RuntimeError)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    with atomic_dir(out_dir) as tmp:
        write_with(tmp, lambda p: hf.save_pretrained(str(p)))
        if tok is not None:
            tok.save(tmp)
            add_chat_template(chat, tmp)
    return Path(out_dir)


Chat = tuple[str, TemplateOptions] | None  # the template a run was fine-tuned with (runs.read_chat)


def _open_for_export(run: str | Path) -> tuple[runs.Run, Chat, Tokenizer | None]:
    """The run, its chat.json and its tokenizer (when it has one), checked before the weights load."""
    opened = runs.open_run(run)
    if opened.hf:
        raise UserError(f"{opened.ckpt}: a Hugging Face model fine-tuned by `miniglm finetune`; `miniglm merge "
                        "RUN --out DIR` makes a transformers folder of it")
    chat = runs.read_chat(opened.dir)
    vocab = runs.read_model_config(opened.ckpt).vocab_size
    tok = runs.load_run_tokenizer(opened, vocab) if (opened.dir / "tokenizer").exists() else None
    return opened, chat, tok


def end_ids(tok: Tokenizer, chat: Chat) -> list[int]:
    """End-of-text, then the end-of-turn tokens of the template the run was fine-tuned with (chat.json)."""
    return [tok.eot_id, *(end_of_turn_ids(chat[0], tok, chat[1]) if chat else [])]


def run_jinja_template(chat: Chat) -> str | None:
    """The run's chat layout (chat.json) as a Jinja chat_template, where one is known."""
    return jinja_template(*chat) if chat else None


def add_chat_template(chat: Chat, tok_dir: Path) -> None:
    """Name the run's chat layout in tokenizer_config.json, so that apply_chat_template renders as we do."""
    template, config = run_jinja_template(chat), tok_dir / "tokenizer_config.json"
    if template is not None and config.exists():
        write_json(config, {**json.loads(config.read_text()), "chat_template": template})


# --- GGUF (llama.cpp) ---------------------------------------------------------------------------
def permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp rotates interleaved pairs; HF/MiniGLM rotate halves. Reorder the rows of q/k to match
    (the same permutation as llama.cpp's convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TYPES = ("f32", "f16", "q8_0")


def export_gguf(run: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """A llama-style run -> one .gguf file, tokenizer model `gpt2` with llama.cpp's `gpt-2` pre-tokenizer
    (or the one an imported GGUF tokenizer recorded).
    outtype f16 / q8_0 stores the weight matrices so (norm weights stay F32, as llama.cpp's converter does)."""
    import gguf  # lazy: start-up time

    opened, chat, tok = _open_for_export(run)
    if runs.read_model_config(opened.ckpt).style != "llama":
        raise UserError("GGUF export needs a llama-style model (style = \"llama\"); export gpt2 style with --to hf")
    run_dir = opened.dir
    tok_file = run_dir / "tokenizer" / "tokenizer.json"
    if tok is None or not tok_file.exists():
        raise UserError(f"{run_dir}: GGUF export needs the byte-level BPE trained by miniglm (tokenizer.json)")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(f"{tok_file}: GGUF export supports byte-level BPE tokenizers only")
    model = runs.load_model(opened).eval()
    c = model.config
    tokens, types, merges = gguf_vocab(spec, c.vocab_size)
    if outtype not in GGUF_TYPES:
        raise UserError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got '{outtype}'")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(run_dir.name)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(file_type)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(recorded_pre_tokenizer(run_dir / "tokenizer"))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(bos_of(tok))  # EOS: the tokenizer's end-of-text
        w.add_eos_token_id(tok.eot_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        eot, chat_template = gguf_chat(chat, tok)
        if eot is not None:  # llama.cpp stops at EOS and EOT: the chat's end of turn
            w.add_eot_token_id(eot)
        if chat_template is not None:  # llama.cpp's server (--jinja) renders chats with it
            w.add_chat_template(chat_template)
        sd = model.state_dict()
        for ours, theirs in gguf_names(c).items():
            t = sd[ours].float()
            if theirs.endswith("attn_q.weight"):
                t = permute_for_gguf(t, c.n_head)
            elif theirs.endswith("attn_k.weight"):
                t = permute_for_gguf(t, c.n_kv_head)
            w.add_tensor(theirs, *_gguf_tensor(t.contiguous().numpy(), outtype))
        write_with(tmp, lambda _: w.write_header_to_file())  # the writer holds the path; these are its writes
        write_with(tmp, lambda _: w.write_kv_data_to_file())
        write_with(tmp, lambda _: w.write_tensors_to_file())
        w.close()
    return Path(out_path)


def gguf_vocab(spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokens, token types and merges of a byte-level BPE's tokenizer.json, as many tokens as the model
    has ids (an id without a token is a [PADi])."""
    import gguf  # lazy: start-up time

    vocab = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    tokens = [""] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in {**vocab, **added}.items():
        if i < vocab_size:
            tokens[i] = text
            types[i] = gguf.TokenType.CONTROL if text in added else gguf.TokenType.NORMAL
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def gguf_names(c: ModelConfig) -> dict[str, str]:
    """MiniGLM weight name -> GGUF tensor name, in llama.cpp's order: gguf_import's tables read backwards
    (no output.weight when the output layer is the embedding's)."""
    names = {ours: theirs for theirs, ours in GLOBAL_NAMES.items() if theirs != "output.weight" or not c.tie_embeddings}
    for i in range(c.n_layer):
        for theirs, ours in LAYER_NAMES.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def gguf_chat(chat: Chat, tok: Tokenizer) -> tuple[int | None, str | None]:
    """(EOT id, Jinja chat_template) for a GGUF. A run on the `hf` template (an imported model) keeps its
    tokenizer's own chat_template, and its end of turn may be the tokenizer's EOS itself (<|im_end|>)."""
    if chat is None:
        return None, None
    turn_ends = end_ids(tok, chat)[1:]
    if chat[0] != "hf":
        return (turn_ends[0] if turn_ends else None), run_jinja_template(chat)
    stops = render("hf", [{"role": "user", "content": "?"}], tok, True, chat[1]).stop_ids
    return (turn_ends or stops or [None])[0], getattr(getattr(tok, "tok", None), "chat_template", None)


def _gguf_tensor(a, outtype: str) -> tuple:
    """(data, raw_shape, raw_dtype) for GGUFWriter.add_tensor: matrices in the requested type, vectors F32.
    Q8_0 needs rows that split into blocks of 32; other rows stay F16."""
    import gguf  # lazy: start-up time

    if a.ndim < 2 or outtype == "f32":
        return a, None, None
    if outtype == "q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), None, gguf.GGMLQuantizationType.Q8_0
    return a.astype("float16"), None, None
