"""The output file of SFT data generation, the record of what is done: a rerun resumes from it.

Records are appended one item at a time by the one Writer. Grouped steps key their records "GROUP#i/n", so
a group cut short by a kill is seen as incomplete; load_output removes it, and a half-written last line,
so that those items are redone.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from pathlib import Path

from miniglm.fileio import UserError, atomic_path
from miniglm.sft.dedup import Deduper


def split_key(key: object) -> tuple[str, int, int] | None:
    """"GROUP#i/n" -> (GROUP, i, n)."""
    m = re.fullmatch(r"(.*)#(\d+)/(\d+)", key, re.S) if isinstance(key, str) else None
    return (m[1], int(m[2]), int(m[3])) if m and int(m[2]) < int(m[3]) else None


def load_output(path: str | Path, grouped: bool) -> tuple[list[dict], int]:
    """Records already in an output file, repaired for resuming, and how many records were dropped.

    An unterminated last line that does not parse was cut off mid-write. In grouped steps, a group missing
    some of its "GROUP#i/n" records was cut short. Both are removed (the file is rewritten without them) so
    the items are redone and nothing is appended after half a line.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --out takes a .jsonl file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    dirty = not raw.endswith(b"\n") and bool(raw)
    dropped = 0
    entries: list[tuple[int, bytes, dict]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if lineno == len(lines):  # the unterminated last line: cut off by a kill
                dirty, dropped = True, dropped + 1
                continue
            raise UserError(f"{path}:{lineno}: not a JSON object; fix or remove that line, or choose another --out")
        if not isinstance(rec.get("question"), str) or (grouped and split_key(rec.get("key")) is None):
            want = "a string 'question' and a 'key' like GROUP#i/n" if grouped else "a string 'question'"
            raise UserError(f"{path}:{lineno}: expected {want}; is --out really this step's output?")
        entries.append((lineno, line, rec))
    if grouped:
        parts: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for _, _, rec in entries:
            group, i, n = split_key(rec["key"])
            parts[group].add((i, n))
        complete = {g for g, p in parts.items() if len({n for _, n in p}) == 1 and len(p) == next(iter(p))[1]}
        kept = [e for e in entries if split_key(e[2]["key"])[0] in complete]
        if len(kept) < len(entries):
            dirty, dropped, entries = True, dropped + len(entries) - len(kept), kept
    if dirty:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(line + b"\n" for _, line, _ in entries))
    return [rec for _, _, rec in entries], dropped


class Writer:
    """The one writer: appends an item's records under a lock and flushes, so whatever is in the file is done."""

    def __init__(self, path: Path, lock: threading.Lock, dedup: Deduper | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.lock, self.dedup = lock, dedup

    def write(self, records: list[dict], group: str | None = None) -> int:
        """Append records, dropping near-duplicate questions; a group's records are keyed GROUP#i/n."""
        with self.lock:
            if self.dedup is not None:
                records = [r for r in records if self.dedup.add(r["question"])]
            if group is not None:
                for i, r in enumerate(records):
                    r["key"] = f"{group}#{i}/{len(records)}"
            if records:  # one write call per item keeps its lines together
                self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                self.f.flush()
            return len(records)

    def close(self) -> None:
        self.f.close()

