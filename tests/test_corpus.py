import json

import pytest

from miniglm.corpus import (
    PrepareOptions,
    clean_text,
    decode_bytes,
    html_to_text,
    prepare_corpus,
    split_chapters,
)
from miniglm.fileio import UserError, plausibility

SIMPLIFIED = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"
TRADITIONAL = ("話說天下大勢，分久必合，合久必分。周末七國分爭，併入於秦。"
               "及秦滅之後，楚、漢分爭，又併入於漢。我們的生活很好。")


@pytest.mark.parametrize("text,enc,expected", [
    (SIMPLIFIED, "utf-8", "utf-8"),
    (SIMPLIFIED, "gbk", "gb18030"),
    (SIMPLIFIED, "gb18030", "gb18030"),
    (TRADITIONAL, "gb18030", "gb18030"),
    (TRADITIONAL, "big5", "big5"),
])
def test_encoding_detection(text, enc, expected):
    d = decode_bytes(text.encode(enc), "x.txt")
    assert d.encoding == expected
    assert d.text == text


def test_big5_is_not_reported_as_gbk():
    data = TRADITIONAL.encode("big5")
    assert data.decode("gb18030")  # the trap: Big5 bytes decode as GB18030 without an error
    wrong = data.decode("gb18030")
    assert plausibility(wrong) < 0.8 < plausibility(TRADITIONAL)
    assert decode_bytes(data, "x.txt").encoding == "big5"


def test_utf8_bom():
    d = decode_bytes(b"\xef\xbb\xbf" + SIMPLIFIED.encode(), "x.txt")
    assert d.encoding == "utf-8-sig" and d.text == SIMPLIFIED


def test_undecodable_names_file_and_offset():
    data = SIMPLIFIED.encode()[:30] + b"\x80\xff\x80\xff" * 3
    with pytest.raises(UserError, match=r"bad\.txt.*byte 30"):
        decode_bytes(data, "bad.txt")
    d = decode_bytes(data, "bad.txt", errors="replace")
    assert d.text.startswith(SIMPLIFIED[:10])


def test_binary_file_is_refused():
    with pytest.raises(UserError, match="binary"):
        decode_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "img.txt")


def test_html_chapter():
    html = ("<html><head><title>第一回 灵根育孕</title><style>p{color:red}</style></head><body>"
            "<h1>第一回 灵根育孕</h1><p>诗曰：&nbsp;混沌未分&amp;天地乱</p>茫茫渺渺<br>无人见<br/>"
            "<script>var x=1;</script><div>盖闻天地之数</div></body></html>")
    text = clean_text(html_to_text(html))
    assert text.split("\n") == ["第一回 灵根育孕", "诗曰： 混沌未分&天地乱", "茫茫渺渺", "无人见", "盖闻天地之数"]


def test_clean_text():
    raw = "第一回　宴桃园\r\n\r\n　　滚滚长江  东逝水，B045浪花\t淘尽英雄。\r\n   \n　　青山依旧在"
    import re
    assert clean_text(raw, drop=re.compile(r"B\d{3}")) == "第一回 宴桃园\n滚滚长江 东逝水，浪花 淘尽英雄。\n青山依旧在"
    assert clean_text("ＡＢＣ１２３，", nfkc=True) == "ABC123,"


def test_split_chapters():
    import re

    from miniglm.corpus import CHAPTER_PATTERN
    text = "《西游记》\n明·吴承恩\n第一回 灵根育孕\n诗曰\n第二回 悟彻菩提\n且说\n楔子 张天师\n话说\n第10章 新\n文"
    pattern = re.compile(CHAPTER_PATTERN, re.MULTILINE)
    docs = split_chapters(text, pattern)
    titles = [d.split("\n")[0] for d in docs]
    assert titles == ["《西游记》", "第一回 灵根育孕", "第二回 悟彻菩提", "楔子 张天师", "第10章 新"]
    assert split_chapters("没有回目的文字\n第二行", pattern) == ["没有回目的文字\n第二行"]


def _novel(n_chapters: int) -> str:
    return "\n".join(f"第{i}回　第{i}回的标题\n　　{SIMPLIFIED * 2}" for i in range(1, n_chapters + 1))


def test_prepare_mixed_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "html").mkdir(parents=True)
    (src / "gbk.txt").write_bytes(_novel(6).encode("gbk"))
    (src / "big5.txt").write_bytes(("第一回 序\n" + TRADITIONAL + "\n第二回 續\n" + TRADITIONAL).encode("big5"))
    for i in range(3):
        (src / "html" / f"{i:03d}.html").write_text(f"<h1>第{i + 1}章</h1><p>{SIMPLIFIED}</p>", encoding="utf-8")
    (src / "docs.jsonl").write_text("\n".join(json.dumps({"content": SIMPLIFIED + str(i)}, ensure_ascii=False)
                                              for i in range(4)), encoding="utf-8")
    opts = PrepareOptions(text_field="content", val_fraction=0.2, seed=1)
    stats = prepare_corpus([str(src)], tmp_path / "out", opts)
    by_name = {f["path"].split("/")[-1]: f for f in stats.files}
    assert by_name["gbk.txt"]["encoding"] == "gb18030" and by_name["gbk.txt"]["documents"] == 6
    assert by_name["big5.txt"]["encoding"] == "big5" and by_name["big5.txt"]["documents"] == 2
    assert by_name["000.html"]["kind"] == "html"
    assert by_name["docs.jsonl"]["documents"] == 4
    assert stats.documents == 6 + 2 + 3 + 4 == stats.train_documents + stats.val_documents
    assert stats.val_documents == 3
    train = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert "　" not in train and "<p>" not in train
    # deterministic by seed; split is by document
    stats2 = prepare_corpus([str(src)], tmp_path / "out2", opts)
    assert (tmp_path / "out2" / "val.jsonl").read_text() == (tmp_path / "out" / "val.jsonl").read_text()
    assert stats2.val_characters == stats.val_characters
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["documents"] == stats.documents and len(saved["files"]) == 6


def test_prepare_glob_and_empty_val(tmp_path):
    (tmp_path / "a.txt").write_text(_novel(1), encoding="utf-8")
    with pytest.raises(UserError, match="empty val split"):
        prepare_corpus([str(tmp_path / "*.txt")], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    with pytest.raises(UserError, match="empty train split"):
        prepare_corpus([str(tmp_path / "*.txt")], tmp_path / "out", PrepareOptions(val_fraction=0.1))
    assert not (tmp_path / "out" / "train.jsonl").exists()
    with pytest.raises(UserError, match="matches no file"):
        prepare_corpus([str(tmp_path / "*.md")], tmp_path / "out", PrepareOptions())


def test_novel_folder_skips_what_is_not_text(tmp_path, capsys):
    """A downloaded novel: HTML chapters beside a metadata info.json, a cover and a stray binary file."""
    from miniglm.cli import main

    book = tmp_path / "book"
    book.mkdir()
    for i in (1, 2, 10):
        (book / f"{i}.html").write_text(f"<h1>第{i}回</h1><p>{SIMPLIFIED}{i}</p>", encoding="utf-8")
    (book / "info.json").write_text(json.dumps({"title": "三国演义", "author": "罗贯中"}, ensure_ascii=False),
                                    encoding="utf-8")
    (book / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    (book / "index.dat.txt").write_bytes(b"\x00\x01\x02" * 100)
    out = tmp_path / "out"
    assert main(["corpus", "prepare", str(book), "--out", str(out), "--split", "file", "--val-fraction", "0.3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["skipped 1 file(s) of an unsupported type: cover.jpg",
                   "skipped 1 file(s) that look binary: index.dat.txt",
                   "skipped 1 file(s) of JSON without text records: info.json"]
    stats = json.loads((out / "stats.json").read_text())
    assert [f["path"].split("/")[-1] for f in stats["files"]] == ["1.html", "2.html", "10.html"]  # natural order
    assert sorted(stats["skipped"]) == ["binary", "no-text", "unsupported"]
    # the same files named on the command line are errors
    for name, message in [("cover.jpg", "unsupported file type '.jpg'"), ("index.dat.txt", "binary"),
                          ("info.json", "info.json:line 1: no string field 'text'")]:
        assert main(["corpus", "prepare", str(book / name), "--out", str(tmp_path / "o2")]) == 2
        assert message in capsys.readouterr().err


def test_folder_still_refuses_a_broken_supported_file(tmp_path):
    (tmp_path / "1.html").write_text(f"<p>{SIMPLIFIED}</p>", encoding="utf-8")
    (tmp_path / "2.txt").write_bytes("正文".encode() + b"\xff\x80\xff\x80")
    with pytest.raises(UserError, match=r"2\.txt: cannot decode"):
        prepare_corpus([str(tmp_path)], tmp_path / "out", PrepareOptions(split="file", val_fraction=0.5))
    (tmp_path / "2.txt").unlink()
    (tmp_path / "docs.json").write_text('{"text": "一"}\n{"text": 二}\n', encoding="utf-8")  # JSON Lines in .json
    with pytest.raises(UserError, match=r"docs\.json:2: not valid JSON"):
        prepare_corpus([str(tmp_path)], tmp_path / "out", PrepareOptions(split="file", val_fraction=0.5))
    (tmp_path / "docs.json").write_text('{"text": "一"}\n{"text": "二"}\n', encoding="utf-8")
    stats = prepare_corpus([str(tmp_path)], tmp_path / "out", PrepareOptions(split="file", val_fraction=0.5))
    assert stats.documents == 3 and not stats.skipped


# --- issue 22: Q (a symlink and its target read once), R (UTF-32 BOMs before UTF-16's) ----------------
def test_a_symlink_and_its_target_are_read_once(tmp_path):
    novel = tmp_path / "novel"
    novel.mkdir()
    (novel / "1.txt").write_text("第一回 出山\n" + SIMPLIFIED + "\n", encoding="utf-8")
    (novel / "2.txt").write_text("第二回 下山\n" + TRADITIONAL + "\n", encoding="utf-8")
    (novel / "3.txt").symlink_to(novel / "1.txt")  # the same chapter under another name
    stats = prepare_corpus([str(novel), str(novel / "3.txt")], tmp_path / "out",
                           PrepareOptions(split="file", val_fraction=0.5, seed=1))
    assert stats.documents == 2 and [f["path"] for f in stats.files] == [str(novel / "1.txt"), str(novel / "2.txt")]
    texts = [json.loads(x)["text"] for s in ("train", "val")
             for x in (tmp_path / "out" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(texts) == sorted(set(texts))  # no chapter in both splits


@pytest.mark.parametrize("enc", ["utf-32", "utf-32-le", "utf-32-be", "utf-16", "utf-16-le", "utf-16-be"])
def test_utf32_and_utf16_boms(enc, tmp_path):
    bom = {"utf-32-le": b"\xff\xfe\x00\x00", "utf-32-be": b"\x00\x00\xfe\xff",
           "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(enc, b"")
    text = "第一回 出山\n" + SIMPLIFIED + "\n第二回 下山\n" + TRADITIONAL
    data = bom + text.encode(enc)
    d = decode_bytes(data, "x.txt")
    assert d.text.lstrip("\ufeff") == text and "\x00" not in d.text
    (tmp_path / "x.txt").write_bytes(data)
    prepare_corpus([str(tmp_path / "x.txt")], tmp_path / "out", PrepareOptions(val_fraction=0.5))
    docs = [json.loads(x)["text"] for s in ("train", "val")
            for x in (tmp_path / "out" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 2 and SIMPLIFIED in "".join(docs) and "\x00" not in "".join(docs)


def test_utf32_records_read_whole(tmp_path):
    from miniglm.fileio import read_jsonl, read_text

    path = tmp_path / "qa.jsonl"
    path.write_bytes('{"text": "话说"}\n{"text": "天下"}\n'.encode("utf-32"))
    assert [r["text"] for _, r in read_jsonl(path)] == ["话说", "天下"]
    assert read_text(path).startswith('{"text"')
