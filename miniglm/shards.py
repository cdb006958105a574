"""Token shards on disk: train.bin / val.bin (flat uint16 or uint32 ids) + meta.json, and a reader
that samples random windows from a memmap, deterministically under a seed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from miniglm.corpus import load_documents
from miniglm.fileio import UserError, atomic_dir, atomic_path, read_json, write_json
from miniglm.tokenizer import Tokenizer, identity

BATCH_DOCS = 256  # documents per encode_batch call: enough to keep both cores busy


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(docs: list[str], tokenizer: Tokenizer, path: Path) -> int:
    """Tokenise each document whole, append end-of-text after each, write the ids flat."""
    dtype = token_dtype(tokenizer.vocab_size)
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(docs), BATCH_DOCS):
            for ids in tokenizer.encode_batch(docs[i:i + BATCH_DOCS]):
                arr = np.asarray([*ids, tokenizer.eot_id], dtype=dtype)
                f.write(arr.tobytes())
                n += len(arr)
    return n


def tokenize_corpus(corpus_dir: str | Path, tokenizer: Tokenizer, out_dir: str | Path) -> dict:
    """corpus_dir/{train,val}.jsonl -> out_dir/{train,val}.bin + meta.json."""
    t0 = time.perf_counter()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    meta: dict = {"tokenizer": tokenizer_ref(tokenizer, out_dir), "tokenizer_identity": identity(tokenizer),
                  "vocab_size": tokenizer.vocab_size,
                  "dtype": token_dtype(tokenizer.vocab_size).name, "eot_id": tokenizer.eot_id,
                  "pad_id": tokenizer.pad_id}
    splits = {}
    for split in ("train", "val"):  # both read before anything is written
        splits[split] = load_documents(corpus_dir / f"{split}.jsonl")
        if not splits[split]:
            raise UserError(f"{corpus_dir / f'{split}.jsonl'}: no documents")
    total_bytes = 0
    with atomic_dir(out_dir) as tmp:  # shards and meta.json are one set: never new train.bin beside old val.bin
        for split, docs in splits.items():
            n = write_tokens(docs, tokenizer, tmp / f"{split}.bin")
            nbytes = sum(len(d.encode()) for d in docs)
            total_bytes += nbytes
            meta[f"{split}_tokens"] = n
            meta[f"{split}_documents"] = len(docs)
            meta[f"{split}_characters"] = sum(len(d) for d in docs)
            meta[f"{split}_bytes"] = nbytes
        seconds = time.perf_counter() - t0
        meta["seconds"] = round(seconds, 3)
        meta["mb_per_s"] = round(total_bytes / 1e6 / seconds, 2)
        write_json(tmp / "meta.json", meta)
    return meta


class TokenShard:
    """A flat array of token ids on disk, read through a memmap."""

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such shard; run `miniglm corpus tokenize` first")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise UserError(f"{self.path.parent / 'meta.json'}: dtype {dtype!r} is not a token type; "
                            "run `miniglm corpus tokenize` again") from None
        size = self.path.stat().st_size
        fix = "the shards are damaged or were cut short; run `miniglm corpus tokenize` again"
        if size == 0:
            raise UserError(f"{self.path}: the shard is empty (0 bytes); {fix}")
        if size % dtype.itemsize:
            raise UserError(f"{self.path}: {size} bytes, not a whole number of {dtype.name} tokens "
                            f"({dtype.itemsize} bytes each); {fix}")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, batch_size: int, block_size: int, rng: np.random.Generator):
        """Random windows: inputs x and next-token targets y, both (batch_size, block_size) int64."""
        import torch

        if len(self.tokens) <= block_size:
            raise UserError(f"{self.path}: {len(self.tokens)} tokens, fewer than a block of {block_size + 1}")
        starts = rng.integers(0, len(self.tokens) - block_size - 1, size=batch_size, endpoint=True)
        windows = np.stack([self.tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path}: no such file; run `miniglm corpus tokenize` first")
    return read_json(path)


def open_shards(data_dir: str | Path) -> tuple[TokenShard, TokenShard, dict]:
    meta = load_meta(data_dir)
    d = Path(data_dir)
    return TokenShard(d / "train.bin", meta["dtype"]), TokenShard(d / "val.bin", meta["dtype"]), meta


def tokenizer_ref(tokenizer: Tokenizer, out_dir: Path) -> str:
    """How meta.json names a tokenizer: a path relative to the meta's folder (so a run folder can move),
    or the name itself (cl100k_base, an HF hub name)."""
    ref = tokenizer.name
    return os.path.relpath(Path(ref).resolve(), out_dir.resolve()) if Path(ref).exists() else ref


def tokenizer_of(data_dir: str | Path) -> str:
    """The tokenizer spec of a shard folder, with a relative path resolved against it."""
    ref = load_meta(data_dir)["tokenizer"]
    candidate = Path(data_dir) / ref
    return str(candidate) if not os.path.isabs(ref) and candidate.exists() else ref
