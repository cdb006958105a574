"""`miniglm sft prepare`: records of any accepted shape -> rendered records (ids + labels) the training
loop reads, with truncation, optional packing, and stats.

    OUT/train.jsonl, OUT/val.jsonl   one {"ids": [...], "labels": [...], "lengths"?: [...]} a line;
                                     "lengths" marks a packed row (position ids restart per record)
    OUT/meta.json                    tokenizer, template, padding side, stop ids, counts
    TEST_OUT (optional)              held-out raw records, {"messages": [...], ...} a line, for `miniglm eval`
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from miniglm.fileio import UserError, atomic_dir, write_json, write_jsonl
from miniglm.sft.formats import Record, load_records
from miniglm.sft.templates import IGNORE, PADDING_SIDE, Rendered, TemplateOptions, render
from miniglm.shards import tokenizer_ref
from miniglm.tokenizer import Tokenizer, identity


@dataclass
class PrepareStats:
    records: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    sequences: int = 0
    padding_efficiency: float = 0.0  # real tokens / (sequences x max_len), without packing
    packed_padding_efficiency: float | None = None
    truncated_where: list[str] = field(default_factory=list)


def fit(template: str, messages: list[dict], tok: Tokenizer, max_len: int,
        opts: TemplateOptions) -> tuple[Rendered | None, bool]:
    """Render within max_len: drop the oldest history turns first, then cut the last prompt's text
    (never the answer). None when even the answer alone does not fit."""
    r = render(template, messages, tok, opts=opts)
    if len(r.ids) <= max_len:
        return r, False
    msgs = list(messages)
    while len(r.ids) > max_len and sum(m["role"] == "user" for m in msgs) > 1:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        nxt = next(i for i in range(first + 1, len(msgs)) if msgs[i]["role"] == "user")
        msgs = msgs[:first] + msgs[nxt:]
        r = render(template, msgs, tok, opts=opts)
    if len(r.ids) <= max_len:
        return r, True
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    content = msgs[last_user]["content"]

    def with_prompt(n: int) -> Rendered:
        trial = [*msgs[:last_user], {"role": "user", "content": content[:n]}, *msgs[last_user + 1:]]
        return render(template, trial, tok, opts=opts)

    if len(with_prompt(0).ids) > max_len:
        return None, True
    lo, hi = 0, len(content)  # the longest prompt prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(with_prompt(mid).ids) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    return with_prompt(lo), True


def pack(rows: list[dict], max_len: int) -> list[dict]:
    """Greedy first-fit-decreasing bin packing of whole records into rows of at most max_len tokens."""
    bins: list[dict] = []
    for r in sorted(rows, key=lambda r: -len(r["ids"])):
        n = len(r["ids"])
        target = next((b for b in bins if len(b["ids"]) + n <= max_len), None)
        if target is None:
            target = {"ids": [], "labels": [], "lengths": []}
            bins.append(target)
        target["ids"] += r["ids"]
        target["labels"] += r["labels"]
        target["lengths"].append(n)
    return bins


def show(rows: list[dict], tok: Tokenizer, k: int) -> str:
    """Token | label columns for the first k rows, as axolotl's debug view prints them."""
    lines = []
    for n, r in enumerate(rows[:k]):
        lines.append(f"--- record {n} ({len(r['ids'])} tokens, {sum(x != IGNORE for x in r['labels'])} trained)")
        for i, (t, lab) in enumerate(zip(r["ids"], r["labels"], strict=True)):
            text = repr(tok.decode([t]))
            lines.append(f"{i:>5} {t:>7} {text:<24} | {'-100' if lab == IGNORE else lab}")
    return "\n".join(lines)


def hold_out(records: list[Record], n: int, seed: int, data: str | Path) -> tuple[list[Record], list[Record]]:
    """(kept, held out): n records picked at random (seeded), each list in file order."""
    if not 0 < n < len(records):
        raise UserError(f"{data}: cannot hold out {n} of {len(records)} records for the test set; "
                        "change --test-fraction or --test-count")
    held = set(random.Random(seed).sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def prepare_sft(data: str | Path, tok: Tokenizer, out_dir: str | Path, template: str = "miniglm",
                max_len: int = 256, val_fraction: float = 0.05, seed: int = 1337,
                opts: TemplateOptions | None = None, packing: bool = False, padding_side: str | None = None,
                columns: str | None = None, values: dict[str, str] | None = None, encoding: str | None = None,
                test_out: str | Path | None = None, test_fraction: float = 0.05, test_count: int = 0) -> dict:
    """padding_side: how training pads (default: the template's); columns, values, encoding: formats.load_records.
    test_out: hold out test_count records (else test_fraction of them) unrendered, for evaluation."""
    opts = opts or TemplateOptions()
    out_dir = Path(out_dir)
    stats = PrepareStats()
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    records = load_records(data, columns, values, encoding)
    stats.records = len(records)
    test: list[Record] = []
    if test_out:
        records, test = hold_out(records, test_count or round(len(records) * test_fraction), seed, data)
    rows = []
    for rec in records:
        try:
            r, truncated = fit(template, rec.messages, tok, max_len, opts)
        except UserError as e:  # name the record that breaks the template
            raise UserError(f"{rec.where}: {e}") from None
        if truncated:
            stats.truncated += 1
            if len(stats.truncated_where) < 5:
                stats.truncated_where.append(rec.where)
        if r is None:
            stats.dropped += 1
            continue
        if all(x == IGNORE for x in r.labels):
            stats.dropped += 1
            continue
        rows.append({"ids": r.ids, "labels": r.labels})
    if not rows:
        raise UserError(f"{data}: no record fits in --max-len {max_len}")
    random.Random(seed).shuffle(rows)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(rows):
        raise UserError(f"{data}: too few records ({len(rows)}) for a val split; lower --val-fraction")
    val, train = rows[:n_val], rows[n_val:]
    stats.tokens = sum(len(r["ids"]) for r in rows)
    stats.trained_tokens = sum(sum(x != IGNORE for x in r["labels"]) for r in rows)
    stats.padding_efficiency = round(stats.tokens / (len(rows) * max_len), 4)
    if packing:
        train, val = pack(train, max_len), pack(val, max_len)
        stats.packed_padding_efficiency = round(stats.tokens / ((len(train) + len(val)) * max_len), 4)
    stats.sequences = len(train) + len(val)
    probe = render(template, [{"role": "user", "content": "?"}], tok, add_generation_prompt=True, opts=opts)
    meta = {"tokenizer": tokenizer_ref(tok, out_dir), "template": template, "template_options": opts.__dict__,
            "max_len": max_len,
            "packed": packing, "padding_side": padding_side or PADDING_SIDE.get(template, "right"),
            "stop_ids": probe.stop_ids,
            "pad_id": tok.pad_id, "vocab_size": tok.vocab_size, "tokenizer_identity": identity(tok),
            "train_records": len(rows) - n_val, "val_records": n_val, "test_records": len(test),
            "test_out": str(test_out) if test_out else None, **stats.__dict__}
    with atomic_dir(out_dir) as tmp:  # records and meta.json are one set, swapped in whole
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "train.jsonl", train)
        write_json(tmp / "meta.json", meta)
    if test_out:  # the held-out raw records, for `miniglm eval --data`
        write_jsonl(test_out, ({"messages": r.messages, **r.extra} for r in test))
    return meta
