"""Pretraining corpus preparation: read raw novels (any Chinese encoding, HTML chapters, jsonl),
clean them, split them into documents and into train/val by document."""

from __future__ import annotations

import glob
import html
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from miniglm.fileio import (
    Decoded,
    UserError,
    atomic_dir,
    best_decoding,
    bom_encoding,
    detect_encoding,
    is_wide,
    read_jsonl,
    read_records,
    write_json,
    write_jsonl,
)

TEXT_SUFFIXES = {".txt", ".text", ".md"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSON_SUFFIXES = {".jsonl", ".json"}
# A chapter title on a line of its own: 第十回, 第3章, 第一卷, and the usual front matter of novels.
CHAPTER_PATTERN = r"^[ \t　]*(?:第[零〇一二两三四五六七八九十百千万\d]+[回章卷节]|楔子|引子|序章)(?:[ \t　].*)?$"

class Skipped(UserError):
    """A file that a folder may hold beside the text (a cover image, a metadata info.json): skipped with a
    summary there, an error when named on the command line."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192] and not is_wide(bom_encoding(data) or "utf-8")


def binary_message(name: str, data: bytes) -> str:
    guess = detect_encoding(data)  # UTF-16 without a BOM looks binary too
    hint = f"; if it is {guess} text, --encoding {guess} reads it" if guess else ""
    return f"{name}: looks like a binary file (NUL bytes){hint}; pass text, HTML or jsonl files"


def decode_bytes(data: bytes, name: str, errors: str = "strict", encoding: str | None = None) -> Decoded:
    """Decode a file's bytes, detecting the encoding unless one is given."""
    if looks_binary(data) and not (encoding and is_wide(encoding)):  # UTF-16 without a BOM has NUL bytes
        raise Skipped(binary_message(name, data), "binary")
    if encoding:
        try:
            return Decoded(data.decode(encoding, errors=errors), encoding, 1.0)
        except UnicodeDecodeError as e:
            bad = data[e.start:e.start + 2].hex(" ")
            raise UserError(f"{name}: not valid {encoding} at byte {e.start} ({bad}); "
                            "try without --encoding or with --errors replace") from None
        except LookupError:
            raise UserError(f"--encoding {encoding}: unknown encoding (e.g. gbk, gb18030, big5, utf-16-le)") from None
    bom = bom_encoding(data)  # UTF-32's before UTF-16's: UTF-32LE's BOM starts with UTF-16LE's
    if bom == "utf-8-sig":
        return replace(decode_bytes(data[3:], name, errors, "utf-8"), encoding="utf-8-sig")
    if bom is not None:
        return decode_bytes(data, name, errors, bom)
    return best_decoding(data, name, errors)


# --- readers ------------------------------------------------------------------------------------
_BLOCK_END = re.compile(r"<\s*(?:br\s*/?|/\s*(?:p|div|h[1-6]|li|tr|title|section|article|blockquote)\s*)>",
                        re.IGNORECASE)
_DROP_BLOCKS = re.compile(r"<\s*(script|style|head)\b.*?<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def html_to_text(markup: str) -> str:
    """Strip an HTML chapter to text: <br> and block ends become newlines, entities unescaped."""
    title = re.search(r"<\s*title[^>]*>(.*?)<\s*/\s*title\s*>", markup, re.IGNORECASE | re.DOTALL)
    body = _DROP_BLOCKS.sub("", markup)
    body = _BLOCK_END.sub("\n", body)
    body = html.unescape(_TAG.sub("", body))
    if title:  # the <head> (and its title) was dropped above; keep the title as the first line
        heading = html.unescape(_TAG.sub("", title.group(1))).strip()
        if heading and heading not in body[:200]:
            body = heading + "\n" + body
    return body


def clean_text(text: str, nfkc: bool = False, drop: re.Pattern | None = None) -> str:
    """Normalise newlines, collapse runs of spaces (incl. full-width), drop empty lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if drop is not None:
        text = drop.sub("", text)
    lines = (re.sub(r"[ \t\u3000\u00a0\f\v]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def split_chapters(text: str, pattern: re.Pattern | None) -> list[str]:
    """Split text at chapter-title lines; text before the first title is its own document."""
    if pattern is None:
        return [text] if text else []
    starts = [m.start() for m in pattern.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(text)]
    return [d for d in (text[a:b].strip() for a, b in zip(bounds, bounds[1:], strict=False)) if d]


# --- the whole stage ----------------------------------------------------------------------------
@dataclass
class PrepareOptions:
    text_field: str = "text"
    split: str = "chapter"  # "chapter" | "file"
    chapter_regex: str = CHAPTER_PATTERN
    val_fraction: float = 0.05
    seed: int = 1337
    nfkc: bool = False
    drop: str | None = None
    errors: str = "strict"
    encoding: str | None = None


@dataclass
class PrepareStats:
    files: list[dict] = field(default_factory=list)
    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    characters: int = 0
    train_characters: int = 0
    val_characters: int = 0
    seconds: float = 0.0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # kind of skip -> files found in folders


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers by value: 2.html before 10.html."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def expand_inputs(inputs: list[str]) -> list[tuple[Path, bool]]:
    """Files, folders (searched recursively) and globs, in natural order, without repeats; each with
    whether it was named on the command line (found in a folder or by a pattern: may be skipped)."""
    paths: dict[Path, bool] = {}
    for spec in inputs:
        if any(c in spec for c in "*?["):
            found = sorted((Path(p) for p in glob.glob(spec, recursive=True)), key=lambda p: natural_key(str(p)))
            if not found:
                raise UserError(f"{spec}: the pattern matches no file")
            named = False
        else:
            found, named = [Path(spec)], True
            if not found[0].exists():
                raise UserError(f"{spec}: no such file or folder")
        for p in found:
            if p.is_dir():
                files = sorted((f for f in p.rglob("*") if f.is_file()),
                               key=lambda f: natural_key(f.relative_to(p).as_posix()))
                if not any(_kind(f) for f in files):
                    raise UserError(f"{p}: the folder holds no .txt, .html or .json/.jsonl file")
                for f in files:
                    paths.setdefault(f, False)
            else:
                paths[p] = paths.get(p, False) or named
    # A symlink and its target (or one file named twice, or by a pattern and a folder) are one file: read it
    # once, where it is first found, else the same text lands in train and in val.
    seen: dict[Path, Path] = {}
    for p, named in paths.items():
        first = seen.setdefault(p.resolve(), p)
        paths[first] = paths[first] or named
    return [(p, paths[p]) for p in seen.values()]


def input_paths(inputs: list[str]) -> list[Path]:
    """The files and folders the inputs name, patterns expanded: what the output must not be or hold."""
    return [Path(p) for spec in inputs
            for p in (glob.glob(spec, recursive=True) if any(c in spec for c in "*?[") else [spec])]


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def read_units(path: Path, opts: PrepareOptions, named: bool = True) -> tuple[list[str], dict]:
    """Read one input file into raw text units (a file, or one per json record) and its file stats.
    named: given on the command line, where a file without a suffix is read as text (in a folder: skipped)."""
    kind = _kind(path) or ("text" if named and not path.suffix else None)
    if kind is None:
        raise Skipped(f"{path}: unsupported file type '{path.suffix}'; pass .txt, .html or .json/.jsonl files",
                      "unsupported")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: the file is empty")
    if kind == "json" and looks_binary(data) and not (opts.encoding and is_wide(opts.encoding)):
        raise Skipped(binary_message(str(path), data), "binary")
    if kind == "json":
        units = _read_json_texts(path, opts.text_field, opts.encoding)
        return units, {"path": str(path), "kind": "json", "encoding": opts.encoding or "utf-8", "records": len(units)}
    decoded = decode_bytes(data, str(path), opts.errors, opts.encoding)
    text = decoded.text
    if kind == "text" and re.match(r"\s*<(!doctype html|html|body|p|div)\b", text[:200], re.IGNORECASE):
        kind = "html"
    if kind == "html":
        text = html_to_text(text)
    info = {"path": str(path), "kind": kind, "encoding": decoded.encoding, "score": round(decoded.score, 3)}
    return [text], info


def _read_json_texts(path: Path, text_field: str, encoding: str | None = None) -> list[str]:
    """The texts of JSON records (an array, one object, or one per line): strings, or their text_field.
    A file where no record has one holds no text (metadata such as info.json); one missing is an error."""
    texts, missing = [], None
    for where, row in read_records(path, encoding):
        value = row.get(text_field) if isinstance(row, dict) else row
        if isinstance(value, str):
            texts.append(value)
        elif missing is None:
            missing = where
    if not texts:
        detail = f"{missing}: no string field '{text_field}' in any record" if missing else f"{path}: no records"
        raise Skipped(f"{detail} (choose the field with --text-field)", "no-text")
    if missing is not None:
        raise UserError(f"{missing}: no string field '{text_field}' (choose it with --text-field)")
    return texts


def _regex(pattern: str, flag: str, flags: int = 0) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise UserError(f"{flag} {pattern!r}: not a valid regular expression ({e})") from None


def prepare_corpus(inputs: list[str], out_dir: str | Path, opts: PrepareOptions) -> PrepareStats:
    """Read, clean and split the inputs; write train.jsonl, val.jsonl and stats.json to out_dir."""
    t0 = time.perf_counter()
    drop = _regex(opts.drop, "--drop") if opts.drop else None
    chapter = _regex(opts.chapter_regex, "--chapter-regex", re.MULTILINE) if opts.split == "chapter" else None
    if not 0.0 <= opts.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    stats = PrepareStats()
    docs: list[dict] = []
    for path, named in expand_inputs(inputs):
        try:
            units, info = read_units(path, opts, named)
        except Skipped as e:
            if named:
                raise
            stats.skipped.setdefault(e.kind, []).append(str(path))
            continue
        n_before = len(docs)
        for unit in units:
            for text in split_chapters(clean_text(unit, opts.nfkc, drop), chapter):
                docs.append({"text": text, "source": path.name})
        info["documents"] = len(docs) - n_before
        info["characters"] = sum(len(d["text"]) for d in docs[n_before:])
        stats.files.append(info)
    if not docs:
        raise UserError("the inputs hold no text after cleaning")

    order = list(range(len(docs)))
    random.Random(opts.seed).shuffle(order)
    n_val = round(len(docs) * opts.val_fraction)
    if opts.val_fraction > 0:
        n_val = max(1, n_val)
    if n_val == 0 or n_val >= len(docs):
        raise UserError(f"empty {'val' if n_val == 0 else 'train'} split: {len(docs)} document(s) with "
                        f"--val-fraction {opts.val_fraction}; add documents, use --split chapter, "
                        "or change --val-fraction")
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]

    stats.documents, stats.train_documents, stats.val_documents = len(docs), len(train), len(val)
    stats.train_characters = sum(len(d["text"]) for d in train)
    stats.val_characters = sum(len(d["text"]) for d in val)
    stats.characters = stats.train_characters + stats.val_characters
    stats.seconds = round(time.perf_counter() - t0, 3)
    with atomic_dir(out_dir) as tmp:  # the three files are one set: swapped in whole
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_json(tmp / "stats.json", stats.__dict__)
    return stats


def load_documents(path: str | Path) -> list[str]:
    """The texts of a prepared split (train.jsonl / val.jsonl)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; run `miniglm corpus prepare` first")
    return [row["text"] for _, row in read_jsonl(path, encoding_flag=False) if isinstance(row.get("text"), str)]


SKIP_REASONS = {"unsupported": "of an unsupported type", "binary": "that look binary",
                "no-text": "of JSON without text records"}


def format_skipped(stats: PrepareStats, shown: int = 5) -> list[str]:
    """One line per kind of skipped file, naming the first few."""
    lines = []
    for kind, paths in stats.skipped.items():
        names = ", ".join(Path(p).name for p in paths[:shown]) + (f" and {len(paths) - shown} more"
                                                                  if len(paths) > shown else "")
        lines.append(f"skipped {len(paths)} file(s) {SKIP_REASONS[kind]}: {names}")
    return lines


def format_stats(stats: PrepareStats) -> str:
    lines = [f"{'file':<40} {'kind':<5} {'encoding':<10} {'docs':>6} {'chars':>10}"]
    for f in stats.files:
        lines.append(f"{Path(f['path']).name[:40]:<40} {f['kind']:<5} {f['encoding']:<10} "
                     f"{f['documents']:>6} {f['characters']:>10,}")
    lines.append(f"{len(stats.files)} file(s), {stats.documents} documents "
                 f"({stats.train_documents} train / {stats.val_documents} val), "
                 f"{stats.characters:,} characters, {stats.seconds:.2f}s")
    return "\n".join(lines)
