"""What SFT data generation asks a chat API, and how its answers are read.

The default prompts are the seed's (Chinese, about Jin Yong's novels); a prompt given on the command line is a
str.format template over the same fields, checked before any request. Answers are read leniently: a numbered
or bulleted list of questions, or Q&A pairs as JSON anywhere in the text.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator, Sequence
from typing import Any

from miniglm.fileio import UserError, require_file

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

