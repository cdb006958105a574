"""Record files as people bring them: JSON Lines under any extension, arrays, single objects, and
fields named with --columns (ChatGLM's --prompt_column/--response_column/--history_column)."""

from __future__ import annotations

import json
import re

import pytest

from miniglm.cli import main
from miniglm.fileio import UserError, read_records
from miniglm.sft.formats import load_records

ADVERTISE = [
    {"content": "类型#上衣*材质#牛仔布*颜色#白色", "summary": "简约而不简单的牛仔外套，白色的衣身十分百搭。"},
    {"content": "类型#裙*风格#简约*图案#条纹", "summary": "条纹的设计简约大方，穿出优雅气质。"},
    {"content": "类型#裤*材质#羊毛", "summary": "羊毛材质的裤子保暖又舒适。"},
    {"content": "类型#上衣*风格#休闲", "summary": "休闲的款式，适合日常穿着。"},
]


def write_lines(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


def test_advertisegen_jsonl_in_a_json_file(tmp_path, bpe_dir, capsys):
    """ChatGLM-6B's own fine-tuning data: dev.json holds one object per line."""
    data = tmp_path / "dev.json"
    write_lines(data, ADVERTISE)
    argv = ["sft", "prepare", "--data", str(data), "--tokenizer", str(bpe_dir), "--template", "plain",
            "--max-len", "128", "--val-fraction", "0.25", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dev.json:line 1: unknown record shape (fields: content, summary)" in err
    assert "--columns content,summary" in err
    assert main([*argv, "--columns", "content,summary"]) == 0
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["train_records"] == 3 and meta["val_records"] == 1
    # the plain template names its parts after the fields, as for a .csv
    assert meta["template_options"]["prompt_field"] == "content"
    assert meta["template_options"]["label_field"] == "summary"


def test_layouts_are_recognised_by_content(tmp_path):
    qa = [{"Question": "问一", "Answer": "答一"}, {"Question": "问二", "Answer": "答二"}]
    write_lines(tmp_path / "qa.txt", qa)
    recs = load_records(tmp_path / "qa.txt")
    assert [r.where.split("/")[-1] for r in recs] == ["qa.txt:line 1", "qa.txt:line 2"]
    assert recs[1].messages[-1]["content"] == "答二"
    (tmp_path / "array.txt").write_text(json.dumps(qa, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [r.where.split("/")[-1] for r in load_records(tmp_path / "array.txt")] == ["array.txt:record 0",
                                                                                       "array.txt:record 1"]
    (tmp_path / "one.jsonl").write_text("\n" + json.dumps(qa[0], indent=2), encoding="utf-8")
    (one,) = load_records(tmp_path / "one.jsonl")
    assert one.messages[0]["content"] == "问一" and one.where.endswith("one.jsonl:line 2")


def test_broken_files_name_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_text('{"Question": "q", "Answer": "a"}\n{"Question": "q"}\n{"Question": 问}\n',
                                      encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.txt:3: not valid JSON"):
        load_records(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text('[\n  {"Question": "q", "Answer": "a"},\n  {"Question": }\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "prose.txt").write_text("这是一段普通的文字。\n第二行。\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prose\.txt:1: not valid JSON .*one object per line"):
        read_records(tmp_path / "prose.txt")
    (tmp_path / "gbk.json").write_bytes('{"Question": "问", "Answer": "答"}'.encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.json:1: not UTF-8 at byte \d+ .*--encoding gbk"):
        read_records(tmp_path / "gbk.json")


def test_columns_with_chatglm_history(tmp_path):
    rows = [{"content": "第三问", "summary": "第三答", "history": [["第一问", "第一答"], ["第二问", "第二答"]]},
            {"content": "单问", "summary": "单答", "history": []},
            {"content": "没有答案", "summary": ""}]  # unlabelled: skipped, as an empty csv cell
    write_lines(tmp_path / "train.json", rows)
    recs = load_records(tmp_path / "train.json", "content,summary,history")
    assert [m["content"] for m in recs[0].messages] == ["第一问", "第一答", "第二问", "第二答", "第三问", "第三答"]
    assert [m["role"] for m in recs[0].messages[:2]] == ["user", "assistant"]
    assert len(recs) == 2 and len(recs[1].messages) == 2
    write_lines(tmp_path / "bad.json", [rows[0], {"content": "q", "summary": "a", "history": [["只有问题"]]}])
    with pytest.raises(UserError, match=r"bad\.json:line 2: history\[0\] must be a \[question, answer\] pair"):
        load_records(tmp_path / "bad.json", "content,summary,history")
    with pytest.raises(UserError, match=r"train\.json:line 1: no field 'answer' \(fields: content, summary"):
        load_records(tmp_path / "train.json", "content,answer")
    with pytest.raises(UserError, match="--columns takes PROMPT,ANSWER"):
        load_records(tmp_path / "train.json", "content")


def test_alpaca_history_must_be_pairs_of_strings(tmp_path):
    good = {"instruction": "问", "output": "答", "history": [["在吗", "在"]]}
    write_lines(tmp_path / "alpaca.jsonl", [good, {**good, "history": [[None, {"a": 1}]]}])
    with pytest.raises(UserError, match=r"alpaca\.jsonl:line 2: history\[0\] must be a \[question, answer\] pair "
                                        r"of strings, got \[null"):
        load_records(tmp_path / "alpaca.jsonl")


def test_value_renames_json_labels(tmp_path):
    write_lines(tmp_path / "hotel.jsonl", [{"label": 1, "review": "很好"}, {"label": 0, "review": "很差"}])
    recs = load_records(tmp_path / "hotel.jsonl", "review,label", {"1": "正面", "0": "负面"})
    assert [r.messages[-1]["content"] for r in recs] == ["正面", "负面"]
    with pytest.raises(UserError, match="--value renames the values of --columns"):
        load_records(tmp_path / "hotel.jsonl", None, {"1": "正面"})


@pytest.mark.parametrize("turn,says", [
    ({"from": "tool", "value": "x"}, "has the role 'tool'; known: human"),
    ({"role": "user", "content": None}, "conversations[0].content must be text, got NoneType"),
    ({"role": "user"}, "needs its text in value/content"),
    ({"value": "x"}, "needs from/role"),
])
def test_a_bad_turn_says_what_is_wrong_with_it(tmp_path, turn, says):
    """Each wrong turn is named for what it gets wrong (it said "needs from/role ... and value/content" even
    where both were there)."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [turn, {"from": "gpt", "value": "好"}]}]), encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(says)):
        load_records(path)
