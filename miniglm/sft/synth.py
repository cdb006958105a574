"""SFT data generation over any OpenAI-compatible chat API (OpenAI, DeepSeek, vLLM, Ollama, ...).

Three steps; each appends one jsonl record per result as soon as its request completes:

    questions   titles/topics -> {"title", "aspect", "question", "key"}
    answers     questions     -> {"question", "answer", ...the input record's other fields}
    passages    corpus chunks -> {"question", "answer", "source", "chunk", "key"}

Rerun the same command after an interruption and it resumes: an item whose key is already in the output is
skipped. Answers are keyed by their question text. Questions and passages write several records per request,
keyed "GROUP#i/n" (GROUP is "title|aspect" or the chunk's hash), so a group cut short by a kill is seen as
incomplete and redone whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import string
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from miniglm.fileio import UserError, atomic_path, read_jsonl, read_text, require_file

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
SYSTEM_PROMPT = "你是一位研究金庸武侠小说的专家。"
ASPECTS = ("人物介绍", "情节", "人物关系", "其他")
ASPECT_HINTS = {
    "人物介绍": "人物的身份、出身、武功、性格和结局",
    "情节": "重要事件的起因、经过和结果",
    "人物关系": "人物之间的师徒、亲属、恋人、朋友和仇敌关系",
    "其他": "武功招式、门派、地点、兵器、历史背景等",
}
QUESTION_PROMPT = (
    "请围绕金庸武侠小说中的“{title}”，从“{aspect}”方面{hint}提出{n}个问题。\n"
    "要求：\n"
    "1. 问题具体、有明确答案，答案能在原著中找到；\n"
    "2. 每个问题独立完整，写出书名或人名，不要用“他”“这部小说”之类的指代；\n"
    "3. 问题之间不要重复；\n"
    "4. 只输出问题列表，每行一个，格式为“01. 问题”，不要输出其他任何内容。"
)
ANSWER_PROMPT = "请你回答下面这个问题，除了回答本身不需要输出其他任何内容。\n问题：{question}\n\n你的回答："
PASSAGE_PROMPT = (
    "下面是一段金庸武侠小说的原文。请根据这段原文提出{n}个问题并给出答案。\n"
    "要求：\n"
    "1. 问题和答案都必须以这段原文为依据，不要编造原文中没有的内容；\n"
    "2. 问题独立完整，写出人名、地名，不要用“这段文字”“他”之类的指代；\n"
    "3. 答案准确完整，一两句话即可；\n"
    '4. 只输出一个 JSON 数组，形如 [{{"question": "问题", "answer": "答案"}}]，不要输出其他任何内容。\n\n'
    "原文：\n{chunk}"
)
RETRY_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_HINTS = {
    400: "the server rejected the request; check --model and the options",
    401: "check the API key in ${env}",
    403: "the key may not have access to this model",
    404: "check --base-url (usually ends in /v1) and --model",
}


@dataclass
class ClientOptions:
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = SYSTEM_PROMPT
    temperature: float = 0.7
    concurrency: int = 4
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # per request, and again per item for malformed answers
    base_delay: float = 1.0  # back-off: base_delay * 2**attempt, with jitter, capped at max_delay
    max_delay: float = 30.0


@dataclass
class Summary:
    step: str
    done: int = 0  # items (requests' worth of work) finished in this run
    written: int = 0  # records appended to the output
    skipped: int = 0  # items already in the output from an earlier run
    duplicates: int = 0  # near-duplicate questions (and repeated chunks) dropped
    rejected: int = 0  # malformed entries dropped from otherwise valid answers
    failed: int = 0  # items given up after the retries; a rerun tries them again
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class APIFatalError(UserError):
    """An API error that retrying cannot fix (400, 401, 403, 404, ...): the run stops."""


class _Failed(Exception):
    """One item gave up after its retries; the run goes on."""


class _Stopped(Exception):
    """The run is stopping (fatal error elsewhere, Ctrl-C): abandon this item quietly."""


# ----------------------------------------------------------------------------- parsing model answers

_NUM = "0-9０-９"
_CJK_NUM = "一二三四五六七八九十百零〇"
_MARKER = re.compile(
    r"^(?:"
    rf"(?P<paren>[(（\[【]\s*[{_NUM}]{{1,3}}\s*[)）\]】])"  # (1) （1） [1] 【1】
    rf"|(?P<digit>(?:[Qq]|问题|问)?\s*[{_NUM}]{{1,3}}\s*(?:[.．](?![{_NUM}])|[、:：)）]))"  # 01. 1、 1) Q1: １．
    rf"|(?P<cjk>[{_CJK_NUM}]{{1,4}}\s*[、.．:：)）])"  # 一、 (a question, or a heading over a numbered list)
    r"|(?P<bullet>[-*•·●○▪+])"  # - q  * q  • q
    r")\s*"
)


def parse_numbered_list(text: str) -> list[str]:
    """The items of a numbered or bulleted list in a model answer.

    Preamble and closing lines, markdown headings and bold are dropped. "一、" lines mixed with "1." lines are
    headings over the list, so they are dropped too. Without any list marker, lines ending in ？ are taken.
    """
    items, plain = [], []
    for line in text.splitlines():
        line = line.replace("**", "").replace("__", "").strip()
        if not line or line.startswith(("#", "```")):
            continue
        m = _MARKER.match(line)
        item = line[m.end():].strip() if m else ""
        if not m:
            plain.append(line)
        elif item and not item.endswith((":", "：")):  # "1. 人物介绍：" introduces a sub-list
            items.append((m.lastgroup, item))
    kinds = {kind for kind, _ in items}
    if "cjk" in kinds and kinds - {"cjk"}:
        items = [(kind, item) for kind, item in items if kind != "cjk"]
    if not items:
        return [line for line in plain if line.endswith(("？", "?"))]
    return [item for _, item in items]


def _json_values(text: str) -> Iterator[Any]:
    """Candidate JSON values in a model answer: the whole text, ```json fences, then any [ or { inside prose."""
    decoder = json.JSONDecoder()
    blocks = re.findall(r"```[A-Za-z]*\s*\n?(.*?)```", text, re.S) + [text]
    for block in blocks:
        block = block.strip()
        try:
            yield json.loads(block)
            continue
        except ValueError:
            pass
        for m in re.finditer(r"[\[{]", block):
            try:
                yield decoder.raw_decode(block, m.start())[0]
            except ValueError:
                continue


def _qa_items(value: Any) -> list:
    if isinstance(value, dict):  # {"qa": [...]} or one bare pair
        lists = [v for v in value.values() if isinstance(v, list)]
        return lists[0] if lists and "question" not in value else [value]
    return value if isinstance(value, list) else []


def parse_qa_pairs(text: str) -> tuple[list[dict], int]:
    """Valid {"question", "answer"} pairs in a model answer, and how many entries were rejected.

    The first JSON value holding at least one valid pair wins; an entry with a missing, empty or
    non-string field is rejected. ([], 0) means the answer held nothing usable.
    """
    for value in _json_values(text):
        entries = _qa_items(value)
        good = []
        for e in entries:
            q = e.get("question", e.get("问题")) if isinstance(e, dict) else None
            a = e.get("answer", e.get("答案")) if isinstance(e, dict) else None
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                good.append({"question": q.strip(), "answer": a.strip()})
        if good:
            return good, len(entries) - len(good)
    return [], 0


# ----------------------------------------------------------------------------- de-duplication

def normalize_question(text: str) -> str:
    """Full-width to half-width (NFKC), lower case, no whitespace or punctuation: the form questions are compared in."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZC")


def bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)} or ({text} if text else set())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduper:
    """Remembers questions; `add` refuses one whose bigram Jaccard similarity to any earlier one is >= threshold.

    Prefix filtering keeps it fast: with the bigrams in a fixed order, two sets that similar must share one of
    their first len - ceil(threshold * len) + 1 bigrams, so only those are indexed and probed.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set[str]] = []
        self.index: dict[str, list[int]] = defaultdict(list)

    def _prefix(self, grams: set[str]) -> list[str]:
        keep = len(grams) - math.ceil(self.threshold * len(grams) - 1e-9) + 1
        return sorted(grams)[:max(keep, 1)]

    def add(self, question: str) -> bool:
        norm = normalize_question(question)
        if not norm or norm in self.exact:
            return False
        grams = bigrams(norm)
        if self.threshold <= 1:
            candidates = {j for g in self._prefix(grams) for j in self.index.get(g, ())}
            if any(jaccard(grams, self.sets[j]) >= self.threshold for j in candidates):
                return False
        self.exact.add(norm)
        self.sets.append(grams)
        for g in self._prefix(grams):
            self.index[g].append(len(self.sets) - 1)
        return True


# ----------------------------------------------------------------------------- corpus chunks

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


# ----------------------------------------------------------------------------- the output file

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


class _Writer:
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


# ----------------------------------------------------------------------------- the API client

def make_client(opts: ClientOptions) -> Any:
    key = os.environ.get(opts.api_key_env, "").strip()
    if not key:
        raise UserError(f"environment variable {opts.api_key_env} is not set: export your API key in it (any "
                        f"non-empty value for a local server without keys) or name another with --api-key-env")
    from openai import OpenAI

    # max_retries=0: we retry ourselves, with back-off shared by the threads and counted in the summary
    return OpenAI(base_url=opts.base_url, api_key=key, max_retries=0, timeout=opts.timeout)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential back-off with jitter (half fixed, half random) so threads do not retry in lockstep;
    a server's Retry-After raises the floor, everything stays under cap."""
    d = min(cap, base * 2 ** attempt)
    d = d / 2 + random.uniform(0, d / 2)
    return min(cap, max(d, retry_after or 0.0))


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class _Session:
    """One client shared by the worker threads, with our retries, usage counting and a stop flag."""

    def __init__(self, client: Any, opts: ClientOptions, summary: Summary):
        self.client, self.opts, self.summary = client, opts, summary
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def count(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self.summary, k, getattr(self.summary, k) + v)

    def _sleep(self, attempt: int, retry_after: float | None = None) -> None:
        self.count(retries=1)
        if self.stop.wait(backoff_delay(attempt, self.opts.base_delay, self.opts.max_delay, retry_after)):
            raise _Stopped

    def _fatal(self, status: int, message: str) -> APIFatalError:
        hint = FATAL_HINTS.get(status, "retrying will not help").replace("{env}", self.opts.api_key_env)
        return APIFatalError(f"{self.opts.base_url}: HTTP {status} ({_one_line(message)}); {hint}")

    def chat(self, prompt: str) -> str:
        """One completion, retried on 429, 5xx, connection errors and time-outs; other 4xx stop the run."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        if self.opts.system_prompt:
            messages.insert(0, {"role": "system", "content": self.opts.system_prompt})
        reason, retry_after = "", None
        for attempt in range(self.opts.max_retries + 1):
            if attempt:
                self._sleep(attempt - 1, retry_after)
            if self.stop.is_set():
                raise _Stopped
            retry_after = None
            self.count(requests=1)
            try:
                resp = self.client.chat.completions.create(
                    model=self.opts.model, messages=messages, temperature=self.opts.temperature)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise self._fatal(e.status_code, e.message) from None
                reason, retry_after = f"HTTP {e.status_code}", _retry_after(e.response.headers)
                continue
            except openai.APITimeoutError:
                reason = f"timed out after {self.opts.timeout:g}s"
                continue
            except openai.APIError as e:  # connection refused/reset, unreadable response
                reason = _one_line(e)
                continue
            usage = getattr(resp, "usage", None)
            if usage is not None:
                self.count(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0,
                           total_tokens=usage.total_tokens or 0)
            choices = getattr(resp, "choices", None) or []
            return (choices[0].message.content or "") if choices else ""
        raise _Failed(f"{reason} (gave up after {self.opts.max_retries + 1} attempts)")

    def ask(self, prompt: str, parse: Callable[[str], T | None]) -> T:
        """chat() until `parse` accepts the answer: a malformed answer is asked again, up to max_retries times."""
        for attempt in range(self.opts.max_retries + 1):
            if attempt:
                self.count(retries=1)
            result = parse(self.chat(prompt))
            if result is not None:
                return result
        raise _Failed(f"no valid answer in {self.opts.max_retries + 1} tries")


def _run(session: _Session, items: list[tuple[str, Any]], work: Callable[[str, Any], None], desc: str,
         progress: bool) -> None:
    """Run work(key, item) on a thread pool of `concurrency`; a failed item is recorded, a fatal error stops all."""
    from tqdm import tqdm

    def guarded(key: str, item: Any) -> None:
        try:
            work(key, item)
        except _Failed as e:
            with session.lock:
                session.summary.failed += 1
                session.summary.failures.append(f"{key}: {e}")
        except _Stopped:
            pass
        except BaseException:
            session.stop.set()  # at once, before this thread takes the next queued item
            raise

    bar = tqdm(total=len(items), desc=desc, unit="item", disable=None if progress else True)
    pool = ThreadPoolExecutor(max_workers=max(1, session.opts.concurrency))
    try:
        for fut in as_completed([pool.submit(guarded, key, item) for key, item in items]):
            fut.result()
            bar.update()
    except BaseException:
        session.stop.set()  # queued items never start; in-flight ones end at their next retry
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _execute(session: _Session, writer: _Writer, items: list[tuple[str, Any]], work: Callable[[str, Any], None],
             progress: bool) -> Summary:
    try:
        _run(session, items, work, session.summary.step, progress)
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


def format_summary(s: Summary) -> str:
    lines = [f"{s.step}: {s.done} done ({s.written} records written), {s.skipped} already done, "
             f"{s.duplicates} duplicates dropped, {s.rejected} malformed entries dropped, {s.failed} failed",
             f"tokens: {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion = {s.total_tokens:,} total "
             f"in {s.requests} requests ({s.retries} retries)"]
    lines += [f"  failed {f}" for f in s.failures[:20]]
    if s.failed > 20:
        lines.append(f"  ... and {s.failed - 20} more")
    if s.failed:
        lines.append("rerun the same command to retry the failed items")
    return "\n".join(lines)


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
    session = _Session(client or make_client(opts), opts, summary)
    dedup = Deduper(dedup_threshold)
    for r in existing:  # new questions are checked against the ones already written too
        dedup.add(r["question"])
    writer = _Writer(out_path, session.lock, dedup)

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
    session = _Session(client or make_client(opts), opts, summary)
    writer = _Writer(out_path, session.lock, None)

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
    session = _Session(client or make_client(opts), opts, summary)
    dedup = Deduper(dedup_threshold)
    for r in existing:
        dedup.add(r["question"])
    writer = _Writer(out_path, session.lock, dedup)

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


# ----------------------------------------------------------------------------- command line

def _options(args: argparse.Namespace) -> ClientOptions:
    for flag, value, low in (("--concurrency", args.concurrency, 1), ("--max-retries", args.max_retries, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be greater than 0, got {args.timeout}")
    return ClientOptions(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                         system_prompt=args.system_prompt, temperature=args.temperature,
                         concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                         base_delay=args.retry_base_delay, max_delay=args.retry_max_delay)


QUESTION_FIELDS = ("title", "aspect", "hint", "n")
ANSWER_FIELDS = ("question",)


def prompt_template(value: str | None, default: str, fields: Sequence[str], required: Sequence[str],
                    option: str) -> str:
    """A prompt given on the command line (or @FILE): a str.format template over `fields`, checked up front
    so that a typo fails before any request is sent."""
    if value is None:
        return default
    if value.startswith("@"):
        value = require_file(value[1:], f"{option} file").read_text(encoding="utf-8-sig")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as e:
        raise UserError(f"{option}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    unknown, missing = names - set(fields), set(required) - names
    if unknown or missing:
        raise UserError(f"{option}: " + "; ".join(
            ([f"unknown placeholder {{{sorted(unknown)[0]}}}"] if unknown else [])
            + ([f"needs {{{sorted(missing)[0]}}}"] if missing else []))
            + f" (placeholders: {', '.join('{' + f + '}' for f in fields)})")
    return value


def cmd_generate_questions(args: argparse.Namespace) -> int:
    titles = args.titles or read_titles(args.titles_file)
    prompt = prompt_template(args.question_prompt, QUESTION_PROMPT, QUESTION_FIELDS, ("title", "n"),
                             "--question-prompt")
    s = generate_questions(titles, args.out, args.per_title, aspects=args.aspects, options=_options(args),
                           dedup_threshold=args.dedup_threshold, prompt=prompt)
    return 1 if s.failed else 0


def cmd_generate_answers(args: argparse.Namespace) -> int:
    prompt = prompt_template(args.answer_prompt, ANSWER_PROMPT, ANSWER_FIELDS, ANSWER_FIELDS, "--answer-prompt")
    s = generate_answers(args.questions, args.out, options=_options(args), dedup_threshold=args.dedup_threshold,
                         prompt=prompt)
    return 1 if s.failed else 0


def cmd_generate_passages(args: argparse.Namespace) -> int:
    s = generate_passage_qa(args.corpus, args.out, args.chunk_chars, args.per_chunk, text_field=args.text_field,
                            options=_options(args), dedup_threshold=args.dedup_threshold)
    return 1 if s.failed else 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output jsonl; appended to, so rerunning the command resumes")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
                   help="OpenAI-compatible API, e.g. http://localhost:8000/v1 for vLLM "
                        "(default: $OPENAI_BASE_URL or %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default: %(default)s)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="system message ('' for none)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries on 429/5xx/time-outs/connection errors and on malformed answers (default: 5)")
    p.add_argument("--retry-base-delay", type=float, default=1.0, help="first back-off in seconds (default: 1)")
    p.add_argument("--retry-max-delay", type=float, default=30.0, help="longest back-off in seconds (default: 30)")
    p.add_argument("--dedup-threshold", type=float, default=0.9,
                   help="drop a question whose character-bigram Jaccard similarity to an earlier one is at "
                        "least this (default: 0.9; above 1 drops only exact duplicates)")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `generate {questions,answers,passages}` under an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate", help="generate Q&A with an OpenAI-compatible chat API",
        description="Generate SFT data with any OpenAI-compatible chat API. Records are appended as they "
                    "arrive; rerun the same command to resume. The API key is read from an environment variable.")
    gsub = gen.add_subparsers(dest="generate_command", required=True, metavar="STEP")

    q = gsub.add_parser("questions", help="titles or topics -> questions jsonl",
                        description="Ask for --per-title questions per title, split over the aspects; "
                                    "near-duplicate questions are dropped.")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--titles", nargs="+", metavar="TITLE", help="novel titles, characters or topics")
    src.add_argument("--titles-file", metavar="FILE", help="one title a line (# starts a comment)")
    q.add_argument("--per-title", type=int, default=60, help="questions per title (default: 60)")
    q.add_argument("--aspects", nargs="+", default=list(ASPECTS), metavar="ASPECT",
                   help="aspects to split the questions over (default: %(default)s)")
    q.add_argument("--question-prompt", metavar="TEXT|@FILE",
                   help="the request, a template over {title} {aspect} {hint} {n} (default: the Chinese Jin Yong "
                        "prompt; {hint} is empty for aspects outside the defaults)")
    _add_common(q)
    q.set_defaults(func=cmd_generate_questions)

    a = gsub.add_parser("answers", help="questions jsonl -> question/answer jsonl",
                        description="Answer each question record; other fields of the record are kept.")
    a.add_argument("--questions", required=True, metavar="FILE", help="jsonl with a 'question' field")
    a.add_argument("--answer-prompt", metavar="TEXT|@FILE",
                   help="the request, a template over {question} (default: the Chinese prompt)")
    _add_common(a)
    a.set_defaults(func=cmd_generate_answers)

    p = gsub.add_parser("passages", help="corpus -> question/answer pairs grounded in its passages",
                        description="Cut documents into chunks at sentence ends and ask for Q&A pairs (as JSON) "
                                    "grounded in each chunk.")
    p.add_argument("--corpus", required=True, metavar="FILE",
                   help="jsonl of {'text'} documents (from `corpus prepare`), a folder of them, or a UTF-8 .txt")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl (default: text)")
    p.add_argument("--chunk-chars", type=int, default=800, help="characters per chunk, about (default: 800)")
    p.add_argument("--per-chunk", type=int, default=3, help="Q&A pairs per chunk (default: 3)")
    _add_common(p)
    p.set_defaults(func=cmd_generate_passages)
    return gen
