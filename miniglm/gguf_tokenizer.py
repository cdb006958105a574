"""Rebuild a GGUF's tokenizer (tokenizer.ggml.*) as an HF `tokenizers` folder that load_tokenizer reads.

A `gpt2` GGUF tokenizer is a byte-level BPE: tokens (already in GPT-2's byte alphabet), merges, a token
type per id (3 = control: special tokens such as <|im_start|>), and the name of llama.cpp's
pre-tokenizer, the split applied before the merges. The folder is a PreTrainedTokenizerFast one
(tokenizer.json + tokenizer_config.json with the special tokens and the model's chat_template), so
it loads through transformers and the `hf` chat template renders with the model's own Jinja.
tokenizer_config.json also records the pre-tokenizer's llama.cpp name (PRE_TOKENIZER_KEY), which
our GGUF export writes back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from miniglm.fileio import UserError, write_json
from miniglm.tokenizer import BYTE_DECODER

PRE_TOKENIZER_KEY = "gguf_pre_tokenizer"
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType

# llama.cpp's pre-tokenizer names, by the split they make (llama-vocab.cpp):
#   GPT-2's regex alone; each digit on its own first, then GPT-2's regex; or one regex isolated first.
GPT2_PRE = ("gpt-2", "mpt", "olmo", "jais")
DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REGEX_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
             "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def recorded_pre_tokenizer(tok_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name an imported tokenizer recorded; `gpt-2` (ours) otherwise."""
    import json

    config = tok_dir / "tokenizer_config.json"
    recorded = json.loads(config.read_text()).get(PRE_TOKENIZER_KEY) if config.exists() else None
    return recorded or "gpt-2"


def pre_tokenizer_for(name: str):
    """The HF pre-tokenizer that splits text as llama.cpp's pre-tokenizer `name` does."""
    from tokenizers import Regex, pre_tokenizers

    if name in GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(REGEX_PRE[name]), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spelled(tokens: list[str]) -> list[str]:
    """Tokens in GPT-2's byte alphabet; a token outside it (a mislabelled special) is respelled byte by byte."""
    spelling = {b: c for c, b in BYTE_DECODER.items()}
    alphabet = set(spelling.values())
    return [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]


def write_gguf_tokenizer(reader, path: Path, out_dir: Path, model_max_length: int,
                         note: Callable[[str], None] | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.
    Returns {"pre_tokenizer": name written, "chat_template": bool}."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    def meta(key: str, default=None):
        field = reader.fields.get(f"tokenizer.{key}")
        return default if field is None else field.contents()

    kind = meta("ggml.model")
    if kind != "gpt2":
        raise UserError(f"{path}: tokenizer model '{kind}' is not supported (miniglm imports byte-level BPE, 'gpt2')")
    tokens = _spelled(list(meta("ggml.tokens")))
    types = list(meta("ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{path}: the token list repeats tokens; it is no BPE vocabulary")
    merges = [tuple(m.split(" ", 1)) for m in meta("ggml.merges", [])]
    pre = meta("ggml.pre", "gpt-2")
    if pre not in (*GPT2_PRE, *DIGITS_PRE, *REGEX_PRE):
        if note:
            note(f"pre-tokenizer '{pre}' is unknown to miniglm; splitting as gpt-2 "
                 "(some texts may tokenize differently)")
        pre = "gpt-2"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizer_for(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED])
    tok.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta(f"ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    specials = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id") or token("eos_token_id")}
    if specials["eos_token"] is None:
        raise UserError(f"{path}: the tokenizer names no EOS token (tokenizer.ggml.eos_token_id)")
    template = meta("chat_template")
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "add_bos_token": bool(meta("ggml.add_bos_token", False)),
        **specials, **({"chat_template": template} if template else {}),
        PRE_TOKENIZER_KEY: pre, "imported_from": path.name})
    write_json(out_dir / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})
    return {"pre_tokenizer": pre, "chat_template": bool(template)}
