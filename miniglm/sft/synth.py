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
import sys
import threading
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from miniglm.fileio import UserError, atomic_path, read_jsonl, require_file

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
