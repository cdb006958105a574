"""Small file helpers shared by every stage: user errors, atomic writes, JSON and JSON Lines reading."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


class UserError(Exception):
    """A mistake in the user's input: the CLI prints it as one line and exits non-zero."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def recover_dir(path: str | Path) -> Path:
    """Replacing a folder takes two renames (old away, new in); a process killed between them leaves
    only `.NAME.old`. Put it back, so the last complete version is found."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    return path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = recover_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; a bad line is a UserError naming it."""
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:
        yield from _json_lines(path, f)


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """The records of a JSON file, recognised by its content whatever the extension (.json, .jsonl, .txt):
    one array is a list of records, one object is one record, one object per line is JSON Lines
    (ChatGLM's AdvertiseGen dev.json, Q&A sets saved as .txt). Each record comes with where it is,
    "FILE:line N" or "FILE:record N", for error messages."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); JSON records must be UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Valid JSON Lines fails as one document at line 2 ("Extra data"): its first line stands alone.
        if _first_line_is_object(text):
            return [(f"{path}:line {n}", row) for n, row in _json_lines(path, text.split("\n"))]
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected one JSON array, "
                        "one object, or one object per line") from None
    if isinstance(obj, list):
        return [(f"{path}:record {i}", row) for i, row in enumerate(obj)]
    if isinstance(obj, dict):
        start = text[:len(text) - len(text.lstrip())].count("\n") + 1
        return [(f"{path}:line {start}", obj)]
    raise UserError(f"{path}: expected JSON records (one array, one object, or one object per line), "
                    f"got a JSON {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    return path
