"""Seed 002's gpt2-chinese example on ChnSentiCorp_htl_all.csv: generate hotel reviews conditioned on a
sentiment label, and check their sentiment with a classifier trained on the same data.

The model is the gpt2-chinese family (GPT-2 + a BERT-style character vocabulary, as
uer/gpt2-chinese-cluecorpussmall), built here at a tiny size from a config with the vocabulary of
the training reviews' characters, random init: one token per character keeps reviews short in
tokens (a byte-level BPE trained on the demo's wuxia world splits most hotel words into bytes), and
it runs `miniglm finetune`'s gpt2-chinese path ([SEP] ends, left padding, spaces dropped on decode).
Everything goes through the CLI on a seeded 80/20 split:

  generator   `finetune --full --columns label,review --value 1=正面 --value 0=负面`
              ("label : 正面 review : " → the review), then `generate --temperature 0.8 --top-k 10 --seed`
              N times per label word
  classifier  `finetune --full --columns review,label --value ...` ("review : … label : " → 正面/负面),
              then `eval classify` on the held-out real reviews and on the generated reviews, whose
              reference is the label they were conditioned on: the sentiment check.

    .venv/bin/python bench/chnsenticorp.py [--gen-steps 600] [--cls-steps 300] [--n 50]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, record, table  # noqa: E402
from raft_cv import cli_ok, read_csv, write_csv  # noqa: E402

from miniglm.fileio import read_json  # noqa: E402

HOTEL = SHARED_DATA / "classify" / "ChnSentiCorp_htl_all.csv"
WORDS = {"1": "正面", "0": "负面"}
VALUES = [a for k, v in WORDS.items() for a in ("--value", f"{k}={v}")]


def split(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first test_fraction of the rows is the test split (as the seed's
    train_test_split(0.2, seed=123))."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_test = round(len(rows) * test_fraction)
    return rows[n_test:], rows[:n_test]


def tiny_gpt2_chinese(out: Path, texts: list[str], n_layer: int = 4, n_embd: int = 128, n_positions: int = 128,
                      min_count: int = 2, seed: int = 0) -> Path:
    """GPT-2 + BertTokenizer over the characters seen at least min_count times (others: [UNK]), with the
    template's words and ASCII wordpieces; random init, saved with save_pretrained."""
    import torch
    from transformers import BertTokenizer, GPT2Config, GPT2LMHeadModel

    counts = Counter(ch for t in texts for ch in t.lower() if not ch.isspace())
    ascii_ = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "label", "review", ":", *ascii_, *(f"##{c}" for c in ascii_),
             *sorted(c for c, n in counts.items() if n >= min_count)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(out / "vocab.txt"), tokenize_chinese_chars=True)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id,
                        tokenizer_class="BertTokenizer")  # as uer's config.json: the gpt2-chinese family
    GPT2LMHeadModel(config).save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return out / "model"


def finetune(model: Path, data: Path, columns: str, run: Path, steps: int, batch: int, lr: float,
             max_len: int = 128) -> dict:
    t0 = time.perf_counter()
    cli_ok(["finetune", "--model", model, "--data", data, "--out", run, "--full", "--columns", columns, *VALUES,
            "--max-len", max_len, "--val-fraction", "0.02", "--set", f"max_steps={steps}", "--set", f"lr={lr}",
            "--set", f"min_lr={lr / 10}", "--set", f"batch_size={batch}", "--set", "warmup_steps=20",
            "--set", f"eval_every={steps}", "--set", "eval_batches=4", "--set", f"log_every={max(steps // 5, 1)}",
            "--set", "threads=1"])
    meta = read_json(run / "data" / "meta.json")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"records": meta["train_records"], "dropped": meta["dropped"], "truncated": meta["truncated"],
            "val_loss": next(r["val_loss"] for r in reversed(rows) if "val_loss" in r),
            "seconds": time.perf_counter() - t0}


def generate(run: Path, prompts: list[str], work: Path, seed: int, max_new_tokens: int = 120) -> list[dict]:
    """`miniglm generate --file … --jsonl` with sampling, all prompts in one batch."""
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli_ok(["generate", "--run", run, "--file", work / "prompts.txt", "--jsonl", "--batch-size", len(prompts),
                "--temperature", "0.8", "--top-k", "10", "--seed", seed, "--max-new-tokens", max_new_tokens])
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]


def classify(run: Path, data: Path, out: Path) -> dict:
    cli_ok(["eval", "classify", "--run", run, "--data", data, "--columns", "review,label", *VALUES,
            "--labels", "正面,负面", "--out", out])
    return read_json(out / "metrics.json")


def pipeline(work: Path, rows: list[dict], gen_steps: int, cls_steps: int, n: int, seed: int,
             test_fraction: float = 0.2, test_limit: int = 0, model_size: dict | None = None) -> dict:
    """Split, build the model, fine-tune generator and classifier, generate, score. test_limit: score only
    the first N held-out reviews (a quick run)."""
    train, test = split(rows, test_fraction, seed)
    test = test[:test_limit or len(test)]
    header = ["label", "review"]
    train_csv, test_csv = write_csv(work / "train.csv", header, train), write_csv(work / "test.csv", header, test)
    model = tiny_gpt2_chinese(work / "base", [r["review"] for r in train], **(model_size or {}))
    gen = finetune(model, train_csv, "label,review", work / "generator", gen_steps, 16, 2e-3)
    cls = finetune(model, train_csv, "review,label", work / "classifier", cls_steps, 16, 1e-3)
    t0 = time.perf_counter()
    outs = generate(work / "generator", [w for w in WORDS.values() for _ in range(n)], work, seed)
    gen_s = time.perf_counter() - t0
    code = {v: k for k, v in WORDS.items()}
    generated = [{"label": code[o["prompt"]], "review": o["output"].strip()} for o in outs]
    gen_csv = write_csv(work / "generated.csv", header, generated)
    real = classify(work / "classifier", test_csv, work / "eval-real")
    fake = classify(work / "classifier", gen_csv, work / "eval-generated")
    per_label = {w: fake["per_class"][w]["recall"] for w in WORDS.values()}
    return {"train": len(train), "test": len(test), "generator": gen,
            "classifier": cls, "real": real, "generated": fake, "per_label": per_label, "samples": generated,
            "empty": sum(not g["review"] for g in generated), "generate_seconds": gen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen-steps", type=int, default=600)
    ap.add_argument("--cls-steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=50, help="generated reviews per label")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [r for r in read_csv(HOTEL)[1] if r["review"].strip() and r["label"] in WORDS]
    with tempfile.TemporaryDirectory() as tmp:
        r = pipeline(Path(tmp), rows, args.gen_steps, args.cls_steps, args.n, args.seed)
    wall = time.perf_counter() - t0
    real, fake = r["real"], r["generated"]
    body = table(["classifier scored on", "n", "accuracy", "macro F1", "majority baseline"], [
        ["held-out real reviews", real["n"], f"**{real['accuracy']:.1%}**", f"{real['macro_f1']:.3f}",
         f"{real['majority_baseline']['accuracy']:.1%} ({real['majority_baseline']['label']})"],
        ["generated reviews (ref = conditioning label)", fake["n"], f"**{fake['accuracy']:.1%}**",
         f"{fake['macro_f1']:.3f}", f"{fake['majority_baseline']['accuracy']:.1%}"],
    ])
    recall = ", ".join(f"{k} {v:.0%}" for k, v in r["per_label"].items())
    g, c = r["generator"], r["classifier"]
    samples = [s for w in WORDS for s in [x for x in r["samples"] if x["label"] == w][:3]]
    body += (f"\n\nChnSentiCorp_htl_all.csv, seeded 80/20 split (seed {args.seed}): {r['train']} train / {r['test']} "
             "held-out reviews. Model: gpt2-chinese family (GPT-2 4x128, BertTokenizer over the training "
             "reviews' characters, random init), full fine-tune, 1 thread. Generator: "
             f"{args.gen_steps} steps (batch 16, lr 2e-3; {g['records']} reviews that fit 128 tokens, "
             f"{g['dropped']} longer ones dropped), val loss {g['val_loss']:.2f}. Classifier: {args.cls_steps} steps "
             f"(batch 16, lr 1e-3; {c['truncated']} long reviews cut), val loss {c['val_loss']:.3f}. "
             f"{args.n} reviews per label, temperature 0.8, top-k 10, seed {args.seed} "
             f"({r['empty']} empty, skipped by eval); the classifier's recall per conditioning label: {recall}. "
             f"Training {g['seconds']:.0f}s + {c['seconds']:.0f}s, generation {r['generate_seconds']:.0f}s, "
             f"all {wall:.0f}s.\n\n"
             "Generated samples:\n\n" + "\n".join(f"- {WORDS[s['label']]}: {s['review']}" for s in samples))
    if args.no_record:
        print(body)
    else:
        record("ChnSentiCorp: label-conditioned reviews and their sentiment check (bench/chnsenticorp.py)", body)


if __name__ == "__main__":
    main()
