"""Load SFT records from json or jsonl into one shape: a list of chat messages.

Accepted record shapes (detected per record):
  alpaca        {instruction, input, output, history: [[q, a], ...], system?}
  sharegpt      {conversations: [{from: human|gpt|system, value}]}
  openai        {messages: [{role: user|assistant|system, content}]}
  seed Q&A      {question, answer} or {Question, Answer}
  seed 002      {instruct, query, answer}
  CMRC / SQuAD  {version, data: [{paragraphs: [{context, qas: [{question, answers: [{text}]}]}]}]} (whole file)
  .csv          two columns as prompt and answer ("PROMPT,ANSWER"; a RAFT task.json beside the file names
                them); rows with an empty cell are skipped (unlabelled rows, ChnSentiCorp's empty review)
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


def csv_columns(path: Path, names: list[str], columns: str | None) -> tuple[str, str]:
    """(prompt column, answer column): as given, else from a RAFT task.json beside the csv."""
    task = path.parent / "task.json"
    if columns is None and task.exists():
        spec = read_json(task)
        if spec.get("data_columns") and spec.get("label_columns"):
            columns = f"{spec['data_columns'][0]},{next(iter(spec['label_columns']))}"
    if columns is None:
        raise UserError(f"{path}: a .csv needs its prompt and answer columns, e.g. --columns "
                        f"\"{','.join(names[:2])}\" (columns: {', '.join(names)})")
    picked = [c.strip() for c in columns.split(",")]
    if len(picked) != 2 or any(c not in names for c in picked):
        raise UserError(f"{path}: --columns must name two of its columns as PROMPT,ANSWER, got '{columns}' "
                        f"(columns: {', '.join(names)})")
    return picked[0], picked[1]


def csv_records(path: Path, columns: str | None = None, values: dict[str, str] | None = None) -> list[Record]:
    """One record per row: the prompt column as the user turn, the answer column as the assistant's.
    values maps whole cells (e.g. ChnSentiCorp's 1/0 to words); the row's ID is kept."""
    import csv

    values = values or {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            names = list(reader.fieldnames or [])
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a UTF-8 csv file ({e})") from None
    prompt_col, answer_col = csv_columns(path, names, columns)
    records = []
    for line, row in rows:
        q, a = (row.get(prompt_col) or "").strip(), (row.get(answer_col) or "").strip()
        if not q or not a:
            continue
        q, a = values.get(q, q), values.get(a, a)
        records.append(Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                              f"{path}:line {line}", {"id": row.get("ID", row.get("id"))}))
    if not records:
        raise UserError(f"{path}: no row has both '{prompt_col}' and '{answer_col}'")
    return records


def load_records(path: str | Path, columns: str | None = None, values: dict[str, str] | None = None) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        return csv_records(path, columns, values)
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
        if isinstance(row.get("answers"), list):  # several references (a held-out SQuAD record)
            keep["answers"] = row["answers"]
        records.append(Record(to_messages(row, where), where, keep))
    if not records:
        raise UserError(f"{path}: no records")
    return records
