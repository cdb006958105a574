"""Corpus preparation and tokenisation speed on the three novels in ../shared/data/novels.

Compares, in one run: our 8k byte-level BPE vs cl100k_base, one document at a time (one core) vs
encode_batch (native threads, all cores). Reports MB/s, chars/token on the val split, and the time
of the whole `prepare + tokenize` path.

    .venv/bin/python bench/tokenize_speed.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, record, table  # noqa: E402

from miniglm import corpus, shards, tokenizer  # noqa: E402


def mb_per_s(fn, docs: list[str]) -> float:
    nbytes = sum(len(d.encode()) for d in docs)
    t0 = time.perf_counter()
    fn(docs)
    return nbytes / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    novels = SHARED_DATA / "novels"
    if not novels.exists():
        sys.exit(f"{novels} is absent")
    tmp = Path(tempfile.mkdtemp(prefix="miniglm-bench-"))
    t0 = time.perf_counter()
    stats = corpus.prepare_corpus([str(novels)], tmp / "corpus", corpus.PrepareOptions(drop=r"B\d{3}"))
    t_prepare = time.perf_counter() - t0
    train_docs = corpus.load_documents(tmp / "corpus" / "train.jsonl")
    val_docs = corpus.load_documents(tmp / "corpus" / "val.jsonl")
    raw_mb = sum(p.stat().st_size for p in novels.glob("*.txt")) / 1e6

    t0 = time.perf_counter()
    bpe = tokenizer.train_bpe(train_docs, 8192, tmp / "bpe8k")
    t_train = time.perf_counter() - t0
    toks = {"bpe 8k (ours)": bpe}
    cl100k = SHARED_DATA / "tokenizers" / "cl100k_base.tiktoken"
    if cl100k.exists():
        toks["cl100k_base"] = tokenizer.load_tokenizer(cl100k)

    rows = []
    for name, tok in toks.items():
        one = mb_per_s(lambda docs, tok=tok: [tok.encode(d) for d in docs], train_docs)
        batch = mb_per_s(tok.encode_batch, train_docs)
        t0 = time.perf_counter()
        shards.tokenize_corpus(tmp / "corpus", tok, tmp / f"data-{name.split()[0]}")
        t_tok = time.perf_counter() - t0
        rep = tokenizer.report(tok, val_docs)
        rows.append([name, tok.vocab_size, rep["chars_per_token"], f"{one:.2f}", f"{batch:.2f}",
                     f"{batch / one:.2f}x", f"{t_tok:.2f}", "ok" if rep["roundtrip_failures"] == 0 else "FAIL"])
    body = table(["tokenizer", "vocab", "chars/token (val)", "MB/s 1 doc at a time", "MB/s encode_batch",
                  "batch/single", "tokenize s", "round trip"], rows)
    body += (f"\n\nnovels: {raw_mb:.1f} MB raw, {stats.documents} documents, {stats.characters:,} characters; "
             f"prepare {t_prepare:.2f}s ({raw_mb / t_prepare:.1f} MB/s); BPE 8k training {t_train:.1f}s; "
             f"prepare + tokenize (bpe 8k) {t_prepare + float(rows[0][6]):.2f}s")
    record("Corpus preparation and tokenisation (bench/tokenize_speed.py)", body)


if __name__ == "__main__":
    main()
