"""Load SFT records into one shape: a list of chat messages.

Files: JSON records (one array, one object, or one object per line; .json, .jsonl or .txt, recognised
by content, see fileio.read_records) or .csv. Accepted record shapes: those of FORMATS below (alpaca,
sharegpt, messages, ...: detected per record), and
  CMRC / SQuAD  {version, data: [{paragraphs: [{context, qas: [{question, answers: [{text}]}]}]}]} (whole file)
  --columns     any shape: PROMPT,ANSWER[,HISTORY] fields, as ChatGLM's --prompt_column/--response_column/
                --history_column (AdvertiseGen: content,summary); HISTORY is a list of [question, answer]
  .csv          two columns as prompt and answer ("PROMPT,ANSWER"; a RAFT task.json beside the file names
                them)
With --columns (and in a .csv) a record with an empty prompt or answer is skipped (unlabelled rows,
ChnSentiCorp's empty review). A bad record is reported with its file, line (JSON Lines) or index
(array) and field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from miniglm.fileio import UserError, read_json, read_records, read_text

if TYPE_CHECKING:  # templates imports the tokenizers; `miniglm --help` reads this module
    from miniglm.sft.templates import TemplateOptions

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


def history_messages(history: object, where: str, key: str = "history") -> list[dict]:
    """ChatGLM/alpaca history, [[question, answer], ...], as user/assistant turns; anything else is an error."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise UserError(f"{where}: field '{key}' must be a list of [question, answer] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{where}: {key}[{i}] must be a [question, answer] pair of strings, got "
                            f"{json.dumps(pair, ensure_ascii=False)[:80]}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def suggest_columns(row: dict) -> str:
    """A --columns value for an unknown record: its first two text fields, and its history if any."""
    texts = [k for k, v in row.items() if isinstance(v, str | int | float) and not isinstance(v, bool)]
    picked = texts[:2] if len(texts) >= 2 else ["PROMPT", "ANSWER"]
    if isinstance(row.get("history"), list):
        picked.append("history")
    value = ",".join(picked)
    return f'"{value}"' if " " in value else value


def chat_messages(row: dict, where: str, key: str) -> list[dict]:
    """sharegpt's conversations or OpenAI's messages: a list of turns, each with its role and text."""
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field '{key}' must be a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise UserError(f"{where}: {key}[{i}] must be an object")
        given = t.get("from", t.get("role"))
        role = ROLES.get(str(given).lower())
        content = t.get("value", t.get("content"))
        if given is None:
            raise UserError(f"{where}: {key}[{i}] needs from/role ({', '.join(ROLES)})")
        if role is None:
            raise UserError(f"{where}: {key}[{i}] has the role {given!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str):
            field = "value" if "value" in t else "content" if "content" in t else None
            raise UserError(f"{where}: {key}[{i}] needs its text in value/content" if field is None else
                            f"{where}: {key}[{i}].{field} must be text, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def alpaca_messages(row: dict, where: str) -> list[dict]:
    instruction = _text(row, "instruction", where)
    extra_input = _text(row, "input", where, required=False)
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    messages += history_messages(row.get("history"), where)
    prompt = instruction + ("\n" + extra_input if extra_input else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    return messages


def instruct_messages(row: dict, where: str) -> list[dict]:
    prompt = _text(row, "instruct", where) + ("\n" + q if (q := _text(row, "query", where, False)) else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "answer", where)}]


def question_messages(row: dict, where: str) -> list[dict]:
    q_key, a_key = ("question", "answer") if "question" in row else ("Question", "Answer")
    return [{"role": "user", "content": _text(row, q_key, where)},
            {"role": "assistant", "content": _text(row, a_key, where)}]


@dataclass(frozen=True)
class RecordFormat:
    marks: tuple[str, ...]  # a record with one of these fields has this format
    parse: Callable[[dict, str], list[dict]]  # (record, where) -> its chat messages
    description: str  # one line: the record's fields


# The record formats, by the name help and errors give them. A record has the first format whose mark it
# carries, so the order decides for a record with the fields of two.
FORMATS: dict[str, RecordFormat] = {
    "sharegpt": RecordFormat(("conversations",), partial(chat_messages, key="conversations"),
                             "{conversations: [{from: human|gpt|system, value}]}"),
    "messages": RecordFormat(("messages",), partial(chat_messages, key="messages"),
                             "{messages: [{role: user|assistant|system, content}]} (OpenAI)"),
    "alpaca": RecordFormat(("instruction",), alpaca_messages,
                           "{instruction, input, output, history: [[q, a], ...], system?}"),
    "instruct/query/answer": RecordFormat(("instruct",), instruct_messages, "{instruct, query, answer} (seed 002)"),
    "question/answer": RecordFormat(("question", "Question"), question_messages,
                                    "{question, answer} or {Question, Answer} (the seed's Q&A)"),
}
SQUAD = "CMRC/SQuAD"  # a whole file: {version, data: [{paragraphs: [{context, qas: [...]}]}]}, see squad_records


def format_names() -> str:
    """The formats as help lists them: every record format, then the whole-file one."""
    return ", ".join([*FORMATS, SQUAD])


def _named(name: str, fmt: RecordFormat) -> str:
    """A format as an error names it: with the field that marks it where its name does not say."""
    return name if name.startswith(fmt.marks[0]) else f"{name} ({fmt.marks[0]})"


def to_messages(row: dict, where: str) -> list[dict]:
    """One record of any accepted format -> [{role, content}, ...] ending with an assistant turn."""
    fmt = next((f for f in FORMATS.values() if any(mark in row for mark in f.marks)), None)
    if fmt is None:
        *names, last = (_named(name, f) for name, f in FORMATS.items())
        raise UserError(f"{where}: unknown record shape (fields: {', '.join(list(row)[:8])}); name the prompt and "
                        f"answer with --columns {suggest_columns(row)}, or use {', '.join(names)} or {last}")
    messages = fmt.parse(row, where)
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: a record must have a user turn and end with an assistant turn")
    return messages


def _objects(parent: dict, key: str, path: Path, at: str = "") -> list[dict]:
    """parent[key] as a list of objects (SQuAD's nesting), or a UserError naming the file and the item."""
    items = parent.get(key, [])
    if not isinstance(items, list):
        raise UserError(f"{path}: {at}{key} must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            got = json.dumps(item, ensure_ascii=False)[:40]
            raise UserError(f"{path}: {at}{key}[{i}] must be a JSON object (a SQuAD file), got {got}")
    return items


def squad_records(obj: dict, path: Path) -> list[Record]:
    records = []
    for i, article in enumerate(_objects(obj, "data", path)):
        for j, paragraph in enumerate(_objects(article, "paragraphs", path, f"data[{i}].")):
            context = paragraph.get("context")
            for qa in _objects(paragraph, "qas", path, f"data[{i}].paragraphs[{j}]."):
                where = f"{path}:{qa.get('id', f'article {i}')}"
                raw = qa.get("answers")
                answers = [a["text"] for a in (raw if isinstance(raw, list) else [])
                           if isinstance(a, dict) and isinstance(a.get("text"), str)]
                if not isinstance(context, str) or not isinstance(qa.get("question"), str) or not answers:
                    raise UserError(f"{where}: a SQuAD question needs context, question and answers[].text")
                prompt = READING_PROMPT.format(context=context, question=qa["question"])
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[0]}]
                records.append(Record(messages, where, {"answers": answers, "id": qa.get("id")}))
    return records


def parse_columns(columns: str) -> list[str]:
    """"PROMPT,ANSWER[,HISTORY]" -> its two or three names."""
    picked = [c.strip() for c in columns.split(",")]
    if len(picked) not in (2, 3) or not all(picked):
        raise UserError(f"--columns takes PROMPT,ANSWER or PROMPT,ANSWER,HISTORY, got '{columns}'")
    return picked


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
        raise UserError(f"{path}: --columns must name two of its columns as PROMPT,ANSWER (a history is for "
                        f"JSON records), got '{columns}' (columns: {', '.join(names)})")
    return picked[0], picked[1]


def parse_values(items: list[str]) -> dict[str, str]:
    """["1=正面", "0=负面"] -> {"1": "正面", "0": "负面"}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--value {item}: expected CELL=TEXT, e.g. --value 1=正面")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def column_fields(data: str, columns: str | None, opts: TemplateOptions,
                  encoding: str | None = None) -> TemplateOptions:
    """The plain template names its two parts after the prompt and answer fields ("Tweet text : … Label : "):
    those of --columns, or of a RAFT task.json beside a .csv; unless the options name them already."""
    if (opts.prompt_field, opts.label_field) != ("Question", "Answer"):
        return opts
    if columns:
        picked = parse_columns(columns)[:2]
    elif str(data).lower().endswith(".csv") and Path(data).is_file():  # a missing file: load_records says so
        import csv

        names = next(csv.reader(read_text(data, encoding).splitlines()), [])
        picked = list(csv_columns(Path(data), names, columns))
    else:
        return opts
    return replace(opts, prompt_field=picked[0], label_field=picked[1])


def csv_records(path: Path, columns: str | None = None, values: dict[str, str] | None = None,
                encoding: str | None = None) -> list[Record]:
    """One record per row: the prompt column as the user turn, the answer column as the assistant's.
    values maps whole cells (e.g. ChnSentiCorp's 1/0 to words); the row's ID is kept."""
    import csv
    import io

    values = values or {}
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, encoding), newline=""))
        names = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not a valid csv file ({e})") from None
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


def _cell(row: dict, name: str, where: str) -> str:
    """A --columns field as text: numbers too (a label 1 or 0, renamed by --value); null is empty."""
    if name not in row:
        raise UserError(f"{where}: no field '{name}' (fields: {', '.join(list(row)[:8])}); check --columns")
    value = row[name]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{where}: field '{name}' must be text, got {type(value).__name__}")
    return str(value)


def column_messages(row: dict, picked: list[str], where: str, values: dict[str, str]) -> list[dict] | None:
    """A record read with --columns PROMPT,ANSWER[,HISTORY]; None when its prompt or answer is empty."""
    q, a = _cell(row, picked[0], where), _cell(row, picked[1], where)
    if not q.strip() or not a.strip():
        return None
    history = history_messages(row.get(picked[2]), where, picked[2]) if len(picked) == 3 else []
    return [*history, {"role": "user", "content": values.get(q, q)}, {"role": "assistant", "content": values.get(a, a)}]


def load_records(path: str | Path, columns: str | None = None, values: dict[str, str] | None = None,
                 encoding: str | None = None) -> list[Record]:
    """columns: "PROMPT,ANSWER[,HISTORY]" fields of every record (else each record's shape is detected);
    values: whole prompt/answer values renamed (e.g. {"1": "正面"}), with columns or a .csv;
    encoding: the file's, when not UTF-8 (--encoding)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        return csv_records(path, columns, values, encoding)
    picked = parse_columns(columns) if columns else None
    if values and not picked:
        raise UserError("--value renames the values of --columns: name the prompt and answer fields too")
    rows = read_records(path, encoding)
    if len(rows) == 1 and isinstance(rows[0][1], dict) and {"data", "version"} <= rows[0][1].keys():
        return squad_records(rows[0][1], path)
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        messages = column_messages(row, picked, where, values or {}) if picked else to_messages(row, where)
        if messages is None:
            continue
        keep = {k: v for k, v in row.items() if k in ("character", "fact", "id", "label", "title")}
        if isinstance(row.get("answers"), list):  # several references (a held-out SQuAD record)
            keep["answers"] = row["answers"]
        records.append(Record(messages, where, keep))
    if not records:
        empty = f" with both '{picked[0]}' and '{picked[1]}'" if picked else ""
        raise UserError(f"{path}: no records{empty}")
    return records
