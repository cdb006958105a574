"""SFT data generation over any OpenAI-compatible chat API (OpenAI, DeepSeek, vLLM, Ollama, ...).

Three steps; each appends one jsonl record per result as soon as its request completes:

    questions   titles/topics -> {"title", "aspect", "question", "key"}
    answers     questions     -> {"question", "answer", ...the input record's other fields}
    passages    corpus chunks -> {"question", "answer", "source", "chunk", "key"}

Rerun the same command after an interruption and it resumes: an item whose key is already in the output is
skipped. Answers are keyed by their question text. Questions and passages write several records per request,
keyed "GROUP#i/n" (GROUP is "title|aspect" or the chunk's hash), so a group cut short by a kill is seen as
incomplete and redone whole.

This module is the steps; their parts: prompts.py (what is asked, how answers are read), client.py (the API,
its retries and the worker pool), resume.py (the output file) and dedup.py (near-duplicate questions). The
command line is cli.py's `sft generate`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from miniglm.fileio import UserError, read_jsonl, read_text, require_file
from miniglm.sft.client import ClientOptions, Session, Summary, format_summary, make_client, run_items
from miniglm.sft.dedup import Deduper
from miniglm.sft.prompts import (
    ANSWER_PROMPT,
    ASPECT_HINTS,
    ASPECTS,
    PASSAGE_PROMPT,
    QUESTION_PROMPT,
    parse_numbered_list,
    parse_qa_pairs,
)
from miniglm.sft.resume import Writer, load_output, split_key

# ----------------------------------------------------------------------------- the inputs: titles, documents, chunks

# A sentence ends after 。！？ (with any closing quotes) or at a line break.
_SENTENCE = re.compile(r"[^。！？!?\n]*(?:[。！？!?]+[”’」』）)\"']*|\n+|$)")


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut text into pieces of about chunk_chars characters, at sentence ends where possible.

    A sentence longer than a chunk is cut hard; a last piece under a quarter chunk joins the one before it.
    """
    chunks, cur = [], ""
    for sent in _SENTENCE.findall(text):
        while len(sent) > chunk_chars:
            if cur.strip():
                chunks.append(cur.strip())
            cur = ""
            chunks.append(sent[:chunk_chars].strip())
            sent = sent[chunk_chars:]
        if cur and len(cur) + len(sent) > chunk_chars:
            chunks.append(cur.strip())
            cur = ""
        cur += sent
    if cur.strip():
        if chunks and len(cur.strip()) < chunk_chars / 4:
            chunks[-1] += cur.rstrip()
        else:
            chunks.append(cur.strip())
    return [c for c in chunks if c]


def chunk_key(chunk: str) -> str:
    return hashlib.sha1(chunk.encode("utf-8")).hexdigest()[:16]


def read_documents(corpus: str | Path | Sequence[str], text_field: str = "text") -> list[tuple[str, str]]:
    """(source, text) pairs from a list of texts, a UTF-8 .txt file, a jsonl of {"text"} records (as written
    by `corpus prepare`, one document a line) or a folder of such jsonl files."""
    if not isinstance(corpus, str | Path):
        return [(f"text{i}", t) for i, t in enumerate(corpus)]
    path = require_file(corpus, "corpus file")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .jsonl files in this folder")
    docs = []
    for f in files:
        if f.suffix != ".jsonl":
            docs.append((f.name, read_text(f, encoding_flag=False)))
            continue
        for lineno, row in read_jsonl(f, encoding_flag=False):
            text = row.get(text_field)
            if not isinstance(text, str):
                raise UserError(f"{f}:{lineno}: no string field '{text_field}'")
            docs.append((f"{f.name}:{lineno}", text))
    return docs


def read_titles(path: str | Path) -> list[str]:
    """One title (or character, or topic) a line; blank lines and lines starting with # are ignored."""
    path = require_file(path, "titles file")
    lines = read_text(path, encoding_flag=False).splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


# ----------------------------------------------------------------------------- running a step

def _execute(session: Session, writer: Writer, items: list[tuple[str, Any]], work: Callable[[str, Any], None],
             progress: bool) -> Summary:
    try:
        run_items(session, items, work, session.summary.step, progress)
    finally:
        writer.close()
        if progress:
            print(format_summary(session.summary))
    return session.summary


def _prepare(step: str, out_path: str | Path, grouped: bool, progress: bool) -> tuple[Summary, Path, list[dict]]:
    out_path = Path(out_path)
    existing, dropped = load_output(out_path, grouped)
    if dropped and progress:
        print(f"{out_path}: removed {dropped} unfinished record(s) of an interrupted run; they will be redone")
    return Summary(step), out_path, existing


# ----------------------------------------------------------------------------- the three steps

def split_count(n: int, k: int) -> list[int]:
    """n split as evenly as possible over k parts, earlier parts first."""
    return [n // k + (i < n % k) for i in range(k)]


def generate_questions(titles: Iterable[str], out_path: str | Path, n_per_title: int = 60, *,
                       aspects: Sequence[str] = ASPECTS, options: ClientOptions | None = None,
                       dedup_threshold: float = 0.9, prompt: str = QUESTION_PROMPT, progress: bool = True,
                       client: Any = None) -> Summary:
    """Ask for n_per_title questions about each title (or character, or topic), split evenly over `aspects`:
    one request per (title, aspect), whose questions are written as the group "title|aspect".

    Questions near-identical to one already written (this run or before) are dropped; a group left with none
    writes nothing, so a rerun asks for it again.
    """
    titles = list(dict.fromkeys(t.strip() for t in titles if t and t.strip()))
    if not titles:
        raise UserError("no titles given")
    if n_per_title < 1:
        raise UserError(f"--per-title must be at least 1, got {n_per_title}")
    if not aspects:
        raise UserError("--aspects: name at least one aspect")
    opts = options or ClientOptions()
    summary, out_path, existing = _prepare("questions", out_path, True, progress)
    done = {split_key(r["key"])[0] for r in existing}
    items = []
    for title in titles:
        for aspect, n in zip(aspects, split_count(n_per_title, len(aspects)), strict=True):
            key = f"{title}|{aspect}"
            if n and key in done:
                summary.skipped += 1
            elif n:
                items.append((key, (title, aspect, n)))
    session = Session(client or make_client(opts), opts, summary)
    dedup = Deduper(dedup_threshold)
    for r in existing:  # new questions are checked against the ones already written too
        dedup.add(r["question"])
    writer = Writer(out_path, session.lock, dedup)

    def work(key: str, item: tuple[str, str, int]) -> None:
        title, aspect, n = item
        hint = f"（{ASPECT_HINTS[aspect]}）" if aspect in ASPECT_HINTS else ""
        text = prompt.format(title=title, aspect=aspect, hint=hint, n=n)
        questions = session.ask(text, lambda answer: parse_numbered_list(answer)[:n] or None)
        records = [{"title": title, "aspect": aspect, "question": q} for q in questions]
        written = writer.write(records, group=key)
        session.count(done=1, written=written, duplicates=len(records) - written)

    return _execute(session, writer, items, work, progress)


def generate_answers(questions_path: str | Path, out_path: str | Path, *, options: ClientOptions | None = None,
                     dedup_threshold: float = 0.9, prompt: str = ANSWER_PROMPT, progress: bool = True,
                     client: Any = None) -> Summary:
    """One answer per question record; the output keeps the record's other fields. Keyed by the question text."""
    questions_path = require_file(questions_path, "questions file")
    rows = []
    for lineno, row in read_jsonl(questions_path, encoding_flag=False):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserError(f"{questions_path}:{lineno}: no non-empty string field 'question'")
        rows.append(row)
    opts = options or ClientOptions()
    summary, out_path, existing = _prepare("answers", out_path, False, progress)
    done = {r["question"].strip() for r in existing}
    dedup = Deduper(dedup_threshold)
    for q in done:
        dedup.add(q)
    items, seen = [], set()
    for row in rows:  # de-duplicated before asking: every answer costs a request
        q = row["question"].strip()
        if q in seen:
            summary.duplicates += 1
        elif q in done:
            summary.skipped += 1
        elif not dedup.add(q):
            summary.duplicates += 1
        else:
            items.append((q, row))
        seen.add(q)
    session = Session(client or make_client(opts), opts, summary)
    writer = Writer(out_path, session.lock, None)

    def work(question: str, row: dict) -> None:
        answer = session.ask(prompt.format(question=question), lambda text: text.strip() or None)
        rest = {k: v for k, v in row.items() if k not in ("question", "answer")}
        written = writer.write([{"question": question, "answer": answer, **rest}])
        session.count(done=1, written=written)

    return _execute(session, writer, items, work, progress)


def generate_passage_qa(corpus: str | Path | Sequence[str], out_path: str | Path, chunk_chars: int = 800,
                        qa_per_chunk: int = 3, *, text_field: str = "text", options: ClientOptions | None = None,
                        dedup_threshold: float = 0.9, prompt: str = PASSAGE_PROMPT, progress: bool = True,
                        client: Any = None) -> Summary:
    """Q&A pairs grounded in chunks of a corpus, asked for as JSON; one request per chunk, whose pairs are
    written as the group named by the chunk's hash."""
    for flag, value in (("--chunk-chars", chunk_chars), ("--per-chunk", qa_per_chunk)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    docs = read_documents(corpus, text_field)
    opts = options or ClientOptions()
    summary, out_path, existing = _prepare("passages", out_path, True, progress)
    done = {split_key(r["key"])[0] for r in existing}
    items, seen = [], set()
    for source, text in docs:
        for chunk in split_chunks(text, chunk_chars):
            key = chunk_key(chunk)
            if key in seen:  # the same text twice (a repeated chapter)
                summary.duplicates += 1
            elif key in done:
                summary.skipped += 1
            else:
                items.append((key, (source, chunk)))
            seen.add(key)
    session = Session(client or make_client(opts), opts, summary)
    dedup = Deduper(dedup_threshold)
    for r in existing:
        dedup.add(r["question"])
    writer = Writer(out_path, session.lock, dedup)

    def parse(text: str) -> tuple[list[dict], int] | None:
        pairs, rejected = parse_qa_pairs(text)
        return (pairs[:qa_per_chunk], rejected) if pairs else None

    def work(key: str, item: tuple[str, str]) -> None:
        source, chunk = item
        pairs, rejected = session.ask(prompt.format(n=qa_per_chunk, chunk=chunk), parse)
        records = [{**p, "source": source, "chunk": chunk} for p in pairs]
        written = writer.write(records, group=key)
        session.count(done=1, written=written, duplicates=len(records) - written, rejected=rejected)

    return _execute(session, writer, items, work, progress)

