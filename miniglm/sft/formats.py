"""Load SFT records from json or jsonl into one shape: a list of chat messages.

Accepted record shapes (detected per record):
  alpaca        {instruction, input, output, history: [[q, a], ...], system?}
  sharegpt      {conversations: [{from: human|gpt|system, value}]}
  openai        {messages: [{role: user|assistant|system, content}]}
  seed Q&A      {question, answer} or {Question, Answer}
  seed 002      {instruct, query, answer}
  CMRC / SQuAD  {version, data: [{paragraphs: [{context, qas: [{question, answers: [{text}]}]}]}]} (whole file)
A bad record is reported with its file, line (jsonl) or index (json) and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from miniglm.fileio import UserError, read_json, read_jsonl

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bot": "assistant", "model": "assistant"}
READING_PROMPT = "阅读下面的文章，回答问题。\n文章：{context}\n问题：{question}"


@dataclass
class Record:
    messages: list[dict]
    where: str  # "file:line N" or "file:record N", for error messages
    extra: dict = field(default_factory=dict)  # fields kept for evaluation (e.g. fact, character)


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string")
    return value


def to_messages(row: dict, where: str) -> list[dict]:
    """One record of any accepted shape -> [{role, content}, ...] ending with an assistant turn."""
    if "conversations" in row or "messages" in row:
        key = "conversations" if "conversations" in row else "messages"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: field '{key}' must be a non-empty list")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise UserError(f"{where}: {key}[{i}] must be an object")
            role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
            content = t.get("value", t.get("content"))
            if role is None or not isinstance(content, str):
                raise UserError(f"{where}: {key}[{i}] needs from/role (human, gpt, user, assistant, system) "
                                "and value/content")
            messages.append({"role": role, "content": content})
    elif "instruction" in row:
        instruction = _text(row, "instruction", where)
        extra_input = _text(row, "input", where, required=False)
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list | tuple) and len(h) == 2 for h in history):
            raise UserError(f"{where}: field 'history' must be a list of [question, answer] pairs")
        messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        for q, a in history:
            messages += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        prompt = instruction + ("\n" + extra_input if extra_input else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    elif "instruct" in row:
        prompt = _text(row, "instruct", where) + ("\n" + q if (q := _text(row, "query", where, False)) else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "answer", where)}]
    elif "question" in row or "Question" in row:
        q_key, a_key = ("question", "answer") if "question" in row else ("Question", "Answer")
        messages = [{"role": "user", "content": _text(row, q_key, where)},
                    {"role": "assistant", "content": _text(row, a_key, where)}]
    else:
        raise UserError(f"{where}: unknown record shape (fields: {', '.join(list(row)[:6])}); expected alpaca "
                        "(instruction/output), sharegpt (conversations), messages, question/answer "
                        "or instruct/query/answer")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: a record must have a user turn and end with an assistant turn")
    return messages


def squad_records(obj: dict, path: Path) -> list[Record]:
    records = []
    for i, article in enumerate(obj.get("data", [])):
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                where = f"{path}:{qa.get('id', f'article {i}')}"
                answers = [a.get("text") for a in qa.get("answers", []) if isinstance(a, dict)]
                if not isinstance(context, str) or not isinstance(qa.get("question"), str) or not answers:
                    raise UserError(f"{where}: a SQuAD question needs context, question and answers[].text")
                prompt = READING_PROMPT.format(context=context, question=qa["question"])
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[0]}]
                records.append(Record(messages, where, {"answers": answers, "id": qa.get("id")}))
    return records


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() == ".jsonl":
        rows = [(f"{path}:line {n}", row) for n, row in read_jsonl(path)]
    else:
        obj = read_json(path)
        if isinstance(obj, dict) and "data" in obj and "version" in obj:
            return squad_records(obj, path)
        if not isinstance(obj, list):
            raise UserError(f"{path}: expected a JSON list of records, or a SQuAD/CMRC file")
        rows = [(f"{path}:record {i}", row) for i, row in enumerate(obj)]
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        keep = {k: v for k, v in row.items() if k in ("character", "fact", "id", "label", "title")}
        records.append(Record(to_messages(row, where), where, keep))
    if not records:
        raise UserError(f"{path}: no records")
    return records
