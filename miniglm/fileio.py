"""Small file helpers shared by every stage: user errors, atomic writes, JSON and JSON Lines reading."""

from __future__ import annotations

import codecs
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


# --- reading user text ---------------------------------------------------------------------------
# Every reader of user text decodes through decode_text, so every command reports a bad byte the same
# way: the file, the byte offset, what the bytes look like, and the --encoding that reads them.
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
NEWLINE = b"\n"


def is_wide(encoding: str) -> bool:
    """UTF-16/32: NUL bytes are normal there, and lines do not end at a b"\\n" byte."""
    try:
        return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    except LookupError:
        return False  # the reader names the unknown encoding


def _lookup(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown encoding (e.g. gbk, gb18030, big5, utf-16-le)") from None


def guess_encoding(data: bytes) -> str | None:
    """What non-UTF-8 bytes most likely are, for the error message: corpus.py's detection."""
    from miniglm.corpus import detect_encoding  # corpus imports this module: import at call time

    return detect_encoding(data)


def _fix(guess: str | None, encoding_flag: bool) -> str:
    """How to read bytes that look like `guess`: the command's --encoding, else converting the file."""
    if guess is None:
        return "--encoding names its encoding" if encoding_flag else "convert it to UTF-8"
    if encoding_flag:
        return f"it looks like {guess}; --encoding {guess} reads it"
    return f"it looks like {guess}; convert it: iconv -f {guess} -t utf-8"


def decode_text(data: bytes, path: str | Path, encoding: str | None = None, errors: str = "strict",
                offset: int = 0, line: int = 1, encoding_flag: bool = True) -> str:
    """Bytes of `path` (from byte `offset`, on line `line`) as text: UTF-8 by default (a BOM is dropped, a
    UTF-16 BOM is followed), else `encoding`. A byte that does not decode is a UserError naming its line and
    offset and the fix: the command's --encoding (encoding_flag), or else converting the file (the files
    other stages wrote)."""
    if encoding is None:
        enc = "utf-16" if offset == 0 and data.startswith(UTF16_BOMS) else "utf-8-sig" if offset == 0 else "utf-8"
    else:
        enc = _lookup(encoding)
    if encoding is None and b"\x00" in data and enc != "utf-16":
        at = data.index(0)
        where = f"{path}:{line + data.count(NEWLINE, 0, at)}"
        guess = guess_encoding(data)
        if guess is None:
            raise UserError(f"{where}: looks like a binary file (NUL byte at byte {offset + at}); pass a text file")
        raise UserError(f"{where}: not UTF-8 at byte {offset + at} (a NUL byte; {_fix(guess, encoding_flag)})")
    try:
        return data.decode(enc, errors=errors)
    except UnicodeDecodeError as e:
        at = offset + e.start
        bad = data[e.start:e.start + 2].hex(" ")
        if encoding is not None:
            raise UserError(f"{path}: not valid {encoding} at byte {at} ({bad}); check --encoding") from None
        where = f"{path}:{line + data.count(NEWLINE, 0, e.start)}"
        fix = _fix(guess_encoding(data), encoding_flag)
        raise UserError(f"{where}: not UTF-8 at byte {at} ({bad}; {fix})") from None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")


def read_text(path: str | Path, encoding: str | None = None, errors: str = "strict",
              encoding_flag: bool = True) -> str:
    """The text of a user's file: UTF-8 unless `encoding` names another (see decode_text)."""
    path = Path(path)
    _check_readable(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode_text(data, path, encoding, errors, encoding_flag=encoding_flag)


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


def read_jsonl(path: str | Path, encoding: str | None = None,
               encoding_flag: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; a bad line is a UserError naming it.
    Read line by line (a corpus split may be large), each decoded as read_text decodes a file."""
    path = Path(path)
    _check_readable(path)
    with open(path, "rb") as f:
        wide = f.read(2) in UTF16_BOMS if encoding is None else is_wide(_lookup(encoding))
    if wide:  # UTF-16/32 lines do not end at a b"\n" byte: decode the file whole
        yield from _json_lines(path, read_text(path, encoding, encoding_flag=encoding_flag).split("\n"))
        return

    def lines() -> Iterator[str]:
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield decode_text(raw, path, encoding, offset=offset, line=lineno, encoding_flag=encoding_flag)
                offset += len(raw)

    yield from _json_lines(path, lines())


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path, encoding: str | None = None,
                 encoding_flag: bool = True) -> list[tuple[str, Any]]:
    """The records of a JSON file, recognised by its content whatever the extension (.json, .jsonl, .txt):
    one array is a list of records, one object is one record, one object per line is JSON Lines
    (ChatGLM's AdvertiseGen dev.json, Q&A sets saved as .txt). Each record comes with where it is,
    "FILE:line N" or "FILE:record N", for error messages."""
    path = Path(path)
    text = read_text(path, encoding, encoding_flag=encoding_flag)
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
        return json.loads(read_text(path, encoding_flag=False))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    return path
