"""One Tokenizer interface over three backends, and a StreamDecoder that never emits half a character.

Backends:
  - a byte-level BPE trained here with HF `tokenizers` (the default for small models),
  - tiktoken (cl100k_base by name, or a local `.tiktoken` file so it works offline),
  - any HF tokenizer by name or path (transformers' AutoTokenizer).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from miniglm.fileio import UserError, atomic_dir, copy_file, write_json, write_with

# End of text, padding, and the chat roles of the native template.
EOT, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [EOT, PAD, *ROLE_TOKENS]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens, and one merge
TIKTOKEN_REF = "miniglm_tiktoken.json"  # marks a folder that holds a tiktoken tokenizer
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel token strings use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_text(texts: Sequence[str]) -> None:
    """Refuse what is not Unicode text before a backend sees it (it would raise, or swap in U+FFFD): a lone
    surrogate, as JSON's "\\ud800" writes one, or a byte that was not UTF-8, which Python's surrogateescape
    reading keeps as U+DC80..U+DCFF."""
    for text in texts:
        if isinstance(text, str) and (m := _SURROGATE.search(text)):
            c, at = ord(m[0]), m.start() + 1
            what = (f"a stray byte 0x{c - 0xDC00:02x} that is not UTF-8 (or a lone surrogate)" if c >= 0xDC80
                    else "a lone surrogate, which is no character")
            raise UserError(f"the text has \\u{c:04x} at character {at}, {what}; give valid Unicode text")


class Tokenizer:
    """What every stage needs from a tokenizer. Subclasses fill in the backend."""

    name: str
    vocab_size: int
    eot_id: int
    pad_id: int
    special_ids: dict[str, int]
    # Control tokens (end of text, chat roles, ...): left out of the text a person reads.
    all_special_ids: frozenset[int] = frozenset()

    @property
    def text_vocab_size(self) -> int:
        """The ids plain text encodes to fit below this; a model's embedding must cover at least these."""
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain text to ids, in parallel over the inputs (all backends use native threads). Text is only
        text: "<|end|>" typed in it is spelt out in ordinary tokens, never the control token, which only a
        template puts in (by id). Text that is not Unicode is refused (check_text)."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of one token, or None where the backend has no such notion."""
        raise NotImplementedError

    def piece_bytes(self, token_id: int) -> bytes | None:
        """One token's bytes as far as the text's validity goes (the sampler's UTF-8 mask, engine.TextMask):
        token_bytes, else the token's own text; None where the id is no token."""
        try:
            piece = self.token_bytes(token_id)
        except (KeyError, IndexError):  # a gap in the ids (tiktoken's, an HF vocabulary's)
            return None
        return piece if piece is not None else self._decode_text([token_id]).encode()

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        parts = [self.token_bytes(i) for i in ids]
        if any(p is None for p in parts):
            return self._decode_text(ids)
        return b"".join(parts).decode("utf-8", errors="replace")  # type: ignore[arg-type]

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    bos_id: int | None = None  # only HF tokenizers that define one (LLaMA's <s>, ...)

    def token_id(self, token: str) -> int | None:
        """The id of a single token given by its text (a special token such as <sop>), or None."""
        return self.special_ids.get(token)

    def special(self, token: str) -> int:
        token_id = self.token_id(token)
        if token_id is None:
            raise UserError(f"tokenizer {self.name} has no token {token} (the template needs it)")
        return token_id

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer into a folder that load_tokenizer() reads back."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A sha256 of what maps text to ids (tokenizer.json, the tiktoken ranks, the vocabulary)."""
        raise NotImplementedError


# --- byte-level BPE trained here ---------------------------------------------------------------
class BPETokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        self.dir, self.file = file.parent, file
        if not file.exists():
            raise UserError(f"{file} is missing; copy the tokenizer folder again (or train it again)")
        try:
            self.tok = HFTok.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise UserError(f"{file} is damaged ({str(e).splitlines()[0][:120] or type(e).__name__}); "
                            "copy the tokenizer folder again (or train it again)") from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        if EOT not in self.special_ids:
            raise UserError(f"{file}: the tokenizer has no {EOT} token")
        self.eot_id = self.special_ids[EOT]
        self.pad_id = self.special_ids.get(PAD, self.eot_id)
        added_tokens = self.tok.get_added_tokens_decoder()
        added = {t.content for t in added_tokens.values()}
        self.all_special_ids = frozenset(i for i, t in added_tokens.items() if t.special)
        self.tok.encode_special_tokens = True  # special-token text in the input is text (encode_batch)
        self._bytes = [
            tok.encode() if tok in added else bytes(BYTE_DECODER[c] for c in tok)
            for tok in sorted(vocab, key=vocab.__getitem__)
        ]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        check_text(texts)
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (self.dir / name).exists() and (self.dir / name).resolve() != (out / name).resolve():
                copy_file(self.dir / name, out / name)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
              han_chars: bool = False) -> BPETokenizer:
    """Train a byte-level BPE with GPT-2's split pattern and no normalizer.

    GPT-2's pattern keeps a run of Chinese characters (all \\p{L}) as one pre-token, so merges can
    form whole words; punctuation and digits split off. han_chars: every Chinese character is a
    pre-token of its own, so a token never spans two characters: a name or a place is then the
    same tokens in every sentence (苏州 in 来自苏州 and in 答：苏州), where GPT-2's pattern may fuse it
    with its neighbours (来自苏州 one token). The result loads in transformers as
    PreTrainedTokenizerFast and its pre-tokenizer is llama.cpp's `gpt-2` (merges within a character
    give the same tokens under either pattern).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if han_chars:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    with atomic_dir(out_dir) as tmp:
        write_with(tmp / "tokenizer.json", lambda path: tok.save(str(path)))
        specials = {"eos_token": EOT, "bos_token": EOT, "unk_token": None, "pad_token": PAD,
                    "additional_special_tokens": ROLE_TOKENS}
        write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False, "add_prefix_space": False, "trained_by": "miniglm",
            **specials})
        write_json(tmp / "special_tokens_map.json", specials)
    return BPETokenizer(out_dir)


# --- tiktoken ------------------------------------------------------------------------------------
class TiktokenTokenizer(Tokenizer):
    def __init__(self, source: str):
        import tiktoken

        self.source = source
        self.name = source if source.endswith(".tiktoken") else source.removeprefix("tiktoken:")
        base = self._load_base(self.name)
        # The chat roles and a pad token go after the base vocabulary, as new special tokens.
        specials = dict(base._special_tokens)
        for t in [PAD, *ROLE_TOKENS]:
            specials.setdefault(t, base.n_vocab + len(specials) - len(base._special_tokens))
        self.enc = tiktoken.Encoding(name=f"{base.name}+miniglm", pat_str=base._pat_str,
                                     mergeable_ranks=base._mergeable_ranks, special_tokens=specials)
        self.vocab_size = self.enc.n_vocab
        self._base_vocab_size = base.n_vocab  # a seed model on cl100k_base has no pad and role tokens
        self.special_ids = {t: specials[t] for t in SPECIAL_TOKENS}
        self.eot_id, self.pad_id = specials[EOT], specials[PAD]
        self._specials = specials
        self.all_special_ids = frozenset(specials.values())

    def token_id(self, token: str) -> int | None:
        return self._specials.get(token)

    @property
    def text_vocab_size(self) -> int:
        return self._base_vocab_size

    @staticmethod
    def _load_base(name: str):
        import tiktoken

        if name.endswith(".tiktoken"):
            path = Path(name)
            if not path.exists():
                raise UserError(f"{path}: no such .tiktoken file")
            # tiktoken looks up its download cache by the hash of the URL; point a private cache at
            # the local file, so the loader (and its hash check) is tiktoken's own.
            cache = Path(tempfile.mkdtemp(prefix="miniglm-tiktoken-"))
            shutil.copyfile(path, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
            old = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
            try:
                from tiktoken_ext.openai_public import cl100k_base

                return tiktoken.Encoding(**cl100k_base())
            except ValueError as e:
                raise UserError(f"{path}: not the cl100k_base ranks tiktoken expects ({e})") from None
            finally:
                if old is None:
                    os.environ.pop("TIKTOKEN_CACHE_DIR", None)
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = old
                shutil.rmtree(cache, ignore_errors=True)
        try:
            return tiktoken.get_encoding(name)
        except ValueError:
            raise UserError(f"unknown tiktoken encoding '{name}'") from None
        except Exception as e:  # no network and no cache
            raise UserError(f"cannot load tiktoken '{name}' ({type(e).__name__}); offline, pass the path "
                            f"of a local {name}.tiktoken file instead") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        check_text(texts)  # encode_ordinary: special-token text is text
        return self.enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def fingerprint(self) -> str:
        """The ranks as a .tiktoken file has them (so cl100k_base by name and by file agree), then the specials."""
        h = hashlib.sha256()
        for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(base64.b64encode(token) + b" %d\n" % rank)
        h.update(json.dumps(sorted(self._specials.items())).encode())
        return h.hexdigest()

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ref = {"backend": "tiktoken", "name": self.name}
        if self.name.endswith(".tiktoken"):  # carry the ranks so the run works offline and if moved
            copy_file(self.name, out / "cl100k_base.tiktoken")
            ref["name"] = "cl100k_base.tiktoken"
        write_json(out / TIKTOKEN_REF, ref)


# --- any HF tokenizer ----------------------------------------------------------------------------
_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"  # CJK + full-width forms
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}]) (?=\S)|(?<=\S) (?=[{_CJK}])")


def join_cjk(text: str) -> str:
    """BertTokenizer (gpt2-chinese) decodes with a space between every two tokens: drop the spaces
    that touch a CJK character or full-width punctuation, keep those between latin words."""
    return _CJK_SPACE.sub("", text)


class HFTokenizer(Tokenizer):
    def __init__(self, name_or_path: str, trust_remote_code: bool = False):
        import logging

        from transformers import AutoTokenizer

        if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise UserError(f"{name_or_path}: no such tokenizer folder")
        # One clear line on failure, not the hub client's retry warnings.
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as e:
            if "trust_remote_code" in str(e):
                raise UserError(f"tokenizer '{name_or_path}' runs its own code: pass --trust-remote-code "
                                "(or --set trust_remote_code=true) if you trust it") from None
            if Path(name_or_path).is_dir():  # a folder that should hold a tokenizer: say what failed
                raise UserError(f"{name_or_path}: cannot load the tokenizer in this folder ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}); copy it again") from None
            raise UserError(f"unknown tokenizer '{name_or_path}': expected cl100k_base, a .tiktoken file, "
                            f"a tokenizer folder, or an HF tokenizer name or path ({type(e).__name__})") from None
        self.name = name_or_path
        self.vocab_size = len(self.tok)
        eot = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eot is None:
            raise UserError(f"tokenizer '{name_or_path}' has neither an EOS nor a SEP token")
        self.eot_id = eot
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else eot
        self.bos_id = self.tok.bos_token_id
        vocab = self._vocab = self.tok.get_vocab()
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        self.special_ids.setdefault(EOT, eot)
        backend = getattr(self.tok, "backend_tokenizer", None)
        byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__ + str(backend.decoder)
        self._id_to_token = {i: t for t, i in vocab.items()} if byte_level else None
        self._added = set(self.tok.all_special_tokens) | set(self.tok.get_added_vocab())
        self.all_special_ids = frozenset(self.tok.all_special_ids) | frozenset(
            i for i, t in self.tok.added_tokens_decoder.items() if t.special)
        # WordPiece (BertTokenizer) joins tokens with spaces: "酒 店 很 好"
        self._spaced = backend is not None and "WordPiece" in str(backend.decoder)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        check_text(texts)
        return self.tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def token_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self._vocab.items()), ensure_ascii=False).encode()).hexdigest()

    def token_bytes(self, token_id: int) -> bytes | None:
        if self._id_to_token is None:
            return None
        tok = self._id_to_token[token_id]
        if tok in self._added:
            return tok.encode()
        return bytes(BYTE_DECODER[c] for c in tok)

    def piece_bytes(self, token_id: int) -> bytes | None:
        """Byte-level: the token's bytes. Otherwise (SentencePiece, WordPiece) the piece's text, and for a
        byte-fallback piece (<0xE4>) its byte, so the mask lets a rare character be spelt out in bytes."""
        if self._id_to_token is not None:
            return super().piece_bytes(token_id)
        piece = self.tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return None
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-start mark is a space

    def _decode_text(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, clean_up_tokenization_spaces=False)
        return join_cjk(text) if self._spaced else text

    def save(self, out_dir: str | Path) -> None:
        write_with(out_dir, lambda path: self.tok.save_pretrained(str(path)))


# --- loading -------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    """A small JSON file of a tokenizer folder; a broken one is named, not a traceback."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not valid JSON: {e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path} is damaged ({why}); copy the tokenizer folder again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object); "
                        "copy the tokenizer folder again")
    return obj


def identity(tokenizer: Tokenizer) -> dict:
    """What meta.json and state.json record of a tokenizer, so that data, runs and tokenizers are matched."""
    return {"vocab_size": tokenizer.vocab_size, "sha256": tokenizer.fingerprint()}


def load_tokenizer(spec: str | Path, trust_remote_code: bool = False) -> Tokenizer:
    """cl100k_base | tiktoken:NAME | FILE.tiktoken | folder or tokenizer.json trained here | HF name/path.
    trust_remote_code: an HF tokenizer whose code lives in its repository (ChatGLM)."""
    spec = str(spec)
    path = Path(spec)
    if spec.endswith(".tiktoken") or spec.startswith("tiktoken:") or spec in ("cl100k_base", "o200k_base"):
        return TiktokenTokenizer(spec)
    if (path / TIKTOKEN_REF).exists():
        name = _read_config(path / TIKTOKEN_REF).get("name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{path / TIKTOKEN_REF} is damaged (no tiktoken 'name'); copy the tokenizer folder again")
        return TiktokenTokenizer(str(path / name) if name.endswith(".tiktoken") else name)
    if path.is_file() and path.name == "tokenizer.json":
        return BPETokenizer(path)
    config = path / "tokenizer_config.json"
    if config.exists() and _read_config(config).get("trained_by") == "miniglm":
        return BPETokenizer(path)
    if spec.startswith("hf:"):
        spec = spec[3:]
    return HFTokenizer(spec, trust_remote_code)


# --- streaming decode ----------------------------------------------------------------------------
class StreamDecoder:
    """Turns a stream of token ids into text chunks that never hold half a UTF-8 character.

    Byte-level tokenizers may split one Chinese character (3 bytes) across tokens; decoding each
    token alone gives '�'. Here the tokens' bytes go through an incremental UTF-8 decoder, which
    holds an incomplete character back until its last byte arrives. The chunks join to exactly
    tokenizer.decode(all ids). Backends without token bytes fall back to decoding the ids so far
    and holding back a trailing '�'.

    Special tokens (<|end|>, <|endoftext|>, ...) are left out of the text unless skip_special_tokens
    is False, as vLLM does: they are control tokens, not words for a person.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._skip = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._sent = 0

    def push(self, ids: int | Iterable[int]) -> str:
        ids = [i for i in ([ids] if isinstance(ids, int) else ids) if i not in self._skip]
        parts = [self.tokenizer.token_bytes(i) for i in ids]
        if self._ids or any(p is None for p in parts):
            self._ids.extend(ids)
            return self._text_so_far(final=False)
        return self._utf8.decode(b"".join(parts))  # type: ignore[arg-type]

    def flush(self, drop_partial: bool = False) -> str:
        """The text held back. drop_partial: an unfinished character at the end (an answer cut by its
        token limit mid-character) is left out rather than shown as U+FFFD."""
        if self._ids:
            return self._text_so_far(final=not drop_partial)
        if drop_partial:
            self._utf8.reset()  # it holds back only the unfinished character's bytes
            return ""
        return self._utf8.decode(b"", final=True)

    def _text_so_far(self, final: bool) -> str:
        text = self.tokenizer.decode(self._ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        if end <= self._sent:
            return ""
        chunk = text[self._sent:end]
        self._sent = end
        return chunk


def report(tokenizer: Tokenizer, docs: Sequence[str]) -> dict:
    """Compression (characters and bytes per token) and the decode(encode(x)) == x check."""
    ids = tokenizer.encode_batch(docs)
    n_tokens = sum(len(x) for x in ids)
    bad = [i for i, (doc, x) in enumerate(zip(docs, ids, strict=True)) if tokenizer.decode(x) != doc]
    chars = sum(len(d) for d in docs)
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "documents": len(docs),
            "characters": chars, "tokens": n_tokens, "chars_per_token": round(chars / max(n_tokens, 1), 3),
            "bytes_per_token": round(sum(len(d.encode()) for d in docs) / max(n_tokens, 1), 3),
            "roundtrip_failures": len(bad), "first_failure": bad[0] if bad else None}
