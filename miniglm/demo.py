"""`miniglm demo`: the whole pipeline on the embedded synthetic wuxia world, in minutes on a CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from miniglm import corpus, shards, tokenizer, world


@dataclass
class DemoOptions:
    out: str = "runs/demo"
    characters: int = 500
    bios: int = 6
    vocab_size: int = 4096
    seed: int = 1337


def run_demo(opts: DemoOptions, log=print) -> dict:
    run = Path(opts.out)
    t0 = time.perf_counter()
    log(f"== 1/4 world: {opts.characters} characters, {opts.bios} biographies each -> {run / 'world'}")
    ws = world.build_world(run / "world", opts.characters, opts.bios, seed=opts.seed)
    log(f"   {ws.biographies} biographies ({ws.corpus_characters:,} characters), "
        f"{ws.sft_train} train Q&A, {ws.sft_test} held-out Q&A ({ws.test_characters} characters)")

    log(f"== 2/4 corpus prepare -> {run / 'corpus'}")
    cs = corpus.prepare_corpus([str(run / "world" / "corpus.jsonl")], run / "corpus",
                               corpus.PrepareOptions(split="file", val_fraction=0.05, seed=opts.seed))
    log(f"   {cs.train_documents} train / {cs.val_documents} val documents")

    log(f"== 3/4 tokenizer train (byte-level BPE, vocab {opts.vocab_size}) -> {run / 'tokenizer'}")
    tok = tokenizer.train_bpe(corpus.load_documents(run / "corpus" / "train.jsonl"), opts.vocab_size,
                              run / "tokenizer")
    rep = tokenizer.report(tok, corpus.load_documents(run / "corpus" / "val.jsonl"))
    log(f"   {rep['chars_per_token']} characters/token on val, round trip failures: {rep['roundtrip_failures']}")

    log(f"== 4/4 corpus tokenize -> {run / 'data'}")
    meta = shards.tokenize_corpus(run / "corpus", tok, run / "data")
    log(f"   {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']})")
    seconds = time.perf_counter() - t0
    log(f"demo done in {seconds:.1f}s: {run}")
    return {"world": ws.__dict__, "corpus": cs.__dict__, "tokenizer": rep, "shards": meta, "seconds": seconds}
