"""Question/answer records -> rendered SFT records (ids + labels) in a folder the training loop reads.

    OUT/train.jsonl, OUT/val.jsonl   one {"ids": [...], "labels": [...]} per record
    OUT/meta.json                    tokenizer, template, counts
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from miniglm.fileio import UserError, read_jsonl, write_json, write_jsonl
from miniglm.sft.templates import IGNORE, render
from miniglm.tokenizer import Tokenizer


def qa_messages(row: dict, where: str) -> list[dict]:
    q = row.get("question", row.get("Question"))
    a = row.get("answer", row.get("Answer"))
    if not isinstance(q, str) or not isinstance(a, str):
        raise UserError(f"{where}: expected string fields question and answer")
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def prepare_sft(data: str | Path, tok: Tokenizer, out_dir: str | Path, template: str = "miniglm",
                max_len: int = 256, val_fraction: float = 0.05, seed: int = 1337) -> dict:
    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise UserError(f"{data}: no such file")
    records, dropped = [], 0
    for lineno, row in read_jsonl(data):
        r = render(template, qa_messages(row, f"{data}:{lineno}"), tok)
        if len(r.ids) > max_len:
            dropped += 1
            continue
        records.append({"ids": r.ids, "labels": r.labels})
    if not records:
        raise UserError(f"{data}: no record fits in --max-len {max_len}")
    random.Random(seed).shuffle(records)
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(records):
        raise UserError(f"{data}: too few records ({len(records)}) for a val split")
    write_jsonl(out_dir / "val.jsonl", records[:n_val])
    write_jsonl(out_dir / "train.jsonl", records[n_val:])
    ref = tok.name
    if Path(ref).exists():
        ref = os.path.relpath(Path(ref).resolve(), out_dir.resolve())
    meta = {"tokenizer": ref, "template": template, "max_len": max_len, "train_records": len(records) - n_val,
            "val_records": n_val, "dropped": dropped, "pad_id": tok.pad_id,
            "vocab_size": tok.vocab_size,
            "trained_tokens": sum(sum(1 for x in r["labels"] if x != IGNORE) for r in records),
            "tokens": sum(len(r["ids"]) for r in records)}
    write_json(out_dir / "meta.json", meta)
    return meta
