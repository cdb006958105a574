"""SFT data generation against a fake OpenAI-compatible server on 127.0.0.1 (no network)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from miniglm.cli import add_sft_generate_parser
from miniglm.fileio import UserError
from miniglm.sft.client import APIFatalError, ClientOptions, backoff_delay, format_summary
from miniglm.sft.dedup import Deduper, bigrams, jaccard, normalize_question
from miniglm.sft.prompts import ASPECTS, parse_numbered_list, parse_qa_pairs
from miniglm.sft.resume import split_key
from miniglm.sft.synth import chunk_key, generate_answers, generate_passage_qa, generate_questions, split_chunks

KEY_ENV = "MINIGLM_SYNTH_TEST_KEY"
FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


# ----------------------------------------------------------------------------- the fake server

def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def fake_question(title: str, aspect: str, i: int) -> str:
    return f"{title}{aspect}问题{md5(f'{title}|{aspect}|{i}')[:8]}是什么？"


def fake_answer(question: str) -> str:
    return f"{question}的答案。"


def fake_passage_question(chunk: str, i: int) -> str:
    return f"片段{md5(chunk)[:8]}第{i}问是什么？"


# every list format a model might use, cycled through the questions of one reply
FORMATS = ["**{i:02d}. {q}**", "{i}、{q}", "{i}) {q}", "({i}) {q}", "（{fw}）{q}", "- {q}", "{fw}．{q}",
           "Q{i}: {q}", "{i}. **{q}**", "[{i}] {q}", "* {q}", "{i:02d}.{q}"]


def reply_questions(prompt: str) -> str:
    m = re.search(r"“(.+?)”，从“(.+?)”方面.*?提出(\d+)个问题", prompt, re.S)
    title, aspect, n = m[1], m[2], int(m[3])
    lines = [f"好的，以下是关于《{title}》{aspect}的{n}个问题：", "", f"### {aspect}"]
    for i in range(1, n + 1):
        fmt = FORMATS[(i + len(title) + len(aspect)) % len(FORMATS)]
        lines.append(fmt.format(i=i, fw=str(i).translate(FULLWIDTH), q=fake_question(title, aspect, i)))
        if i == 1:
            lines.append("")
    lines += ["", "以上问题希望对你有帮助！"]
    return "\n".join(lines)


def reply_passage(prompt: str) -> str:
    chunk = prompt.split("原文：\n", 1)[1]
    n = int(re.search(r"提出(\d+)个问题并给出答案", prompt)[1])
    pairs = [{"question": fake_passage_question(chunk, i), "answer": chunk[:12]} for i in range(n)]
    pairs.append({"question": "一个没有答案的问题？", "answer": ""})  # must be rejected, not written
    text = json.dumps(pairs, ensure_ascii=False, indent=1)
    if int(md5(chunk)[0], 16) % 2:
        return f"```json\n{text}\n```"
    return f"好的，下面是根据原文整理的问答：\n{text}\n希望有帮助。"


def reply(prompt: str) -> str:
    """Deterministic answers derived from the prompt, so tests can check the content."""
    if "你的回答：" in prompt:
        return fake_answer(re.search(r"问题：(.*)\n\n你的回答：", prompt, re.S)[1])
    if "原文：\n" in prompt:
        return reply_passage(prompt)
    return reply_questions(prompt)


class FakeAPI:
    """State and script of the fake server. Faults, per request whose prompt contains every `match` string:
    "429" (with Retry-After: 0), "500", "400"/"401"/"404", "timeout" (hangs past the client's time-out),
    "junk" (text with neither a list nor JSON), "empty" (empty content)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rules: list[tuple[tuple[str, ...], list[str], str | None]] = []
        self.fail_after: tuple[int, str] | None = None  # after N good replies, every request gets this fault
        self.reply_fn = reply
        self.delay = 0.0
        self.hang = 0.6
        self.requests = self.good = self.inflight = self.max_inflight = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.url = ""

    def inject(self, *match: str, faults: tuple[str, ...] = (), forever: str | None = None) -> None:
        self.rules.append((match, list(faults), forever))

    def fault(self, prompt: str) -> str | None:
        with self.lock:
            if self.fail_after is not None and self.good >= self.fail_after[0]:
                return self.fail_after[1]
            for match, faults, forever in self.rules:
                if all(m in prompt for m in match) and (faults or forever):
                    return faults.pop(0) if faults else forever
        return None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        api: FakeAPI = self.server.api
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self.send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
        with api.lock:
            api.requests += 1
            api.inflight += 1
            api.max_inflight = max(api.max_inflight, api.inflight)
        try:
            prompt = body["messages"][-1]["content"]
            fault = api.fault(prompt)
            time.sleep(api.delay)
            if fault == "timeout":
                time.sleep(api.hang)  # the client has given up by now
                return
            if fault and fault.isdigit():
                return self.send(int(fault), {"error": {"message": f"injected {fault}", "type": "server_error"}},
                                 {"Retry-After": "0"} if fault == "429" else None)
            content = {"junk": "好的。\n\n（这里没有问题列表，也没有 JSON。）", "empty": ""}.get(fault) \
                if fault else api.reply_fn(prompt)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(content),
                     "total_tokens": len(prompt) + len(content)}
            with api.lock:
                api.good += 1
                api.prompt_tokens += usage["prompt_tokens"]
                api.completion_tokens += usage["completion_tokens"]
            self.send(200, {"id": f"chatcmpl-{api.requests}", "object": "chat.completion", "created": int(time.time()),
                            "model": body["model"], "usage": usage,
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]})
        finally:
            with api.lock:
                api.inflight -= 1


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out closed the socket: expected


@pytest.fixture
def api():
    fake = FakeAPI()
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.api = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def options(api: FakeAPI, **kw) -> ClientOptions:
    base = dict(base_url=api.url, model="fake-model", api_key_env=KEY_ENV, concurrency=4, timeout=2.0,
                max_retries=3, base_delay=0.01, max_delay=0.05)
    return ClientOptions(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_questions(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "title": "天龙八部"}, ensure_ascii=False) + "\n"
                            for q in questions), encoding="utf-8")
    return path


def assert_tokens(summary, api: FakeAPI) -> None:
    assert summary.prompt_tokens == api.prompt_tokens > 0
    assert summary.completion_tokens == api.completion_tokens > 0
    assert summary.total_tokens == api.prompt_tokens + api.completion_tokens
    assert summary.requests == api.requests


# ----------------------------------------------------------------------------- parsing

def test_parse_numbered_list_formats():
    text = """好的，以下是关于《天龙八部》的问题：

### 人物介绍
**01. 乔峰的身世是什么？**
1、段誉学会了哪些武功？

2) 虚竹是如何成为逍遥派掌门的？
(3) 慕容复的理想是什么？
（４）阿朱是怎么死的？
- 天山童姥是谁？
* 王语嫣喜欢谁？
• 鸠摩智来自哪里？
１．丁春秋的外号是什么？
１２、段正淳有几个情人？
Q13: 萧远山为何隐居少林？
问题14：扫地僧是谁？
15. **无崖子**的弟子有哪些？
[16] 阿紫的姐姐是谁？
【17】星宿派在哪里？
18.
1.5亿两银子

以上就是全部问题，希望对你有帮助！"""
    assert parse_numbered_list(text) == [
        "乔峰的身世是什么？", "段誉学会了哪些武功？", "虚竹是如何成为逍遥派掌门的？", "慕容复的理想是什么？",
        "阿朱是怎么死的？", "天山童姥是谁？", "王语嫣喜欢谁？", "鸠摩智来自哪里？", "丁春秋的外号是什么？",
        "段正淳有几个情人？", "萧远山为何隐居少林？", "扫地僧是谁？", "无崖子的弟子有哪些？", "阿紫的姐姐是谁？",
        "星宿派在哪里？"]
    # Chinese numerals: items on their own, headings when mixed with a numbered list
    assert parse_numbered_list("一、郭靖的师父是谁？\n二、黄蓉的父亲是谁？\n十一、杨康的结局？") == [
        "郭靖的师父是谁？", "黄蓉的父亲是谁？", "杨康的结局？"]
    assert parse_numbered_list("一、人物介绍\n1. 郭靖的师父是谁？\n二、情节\n2. 华山论剑在哪？\n3. 情节：") == [
        "郭靖的师父是谁？", "华山论剑在哪？"]
    # no markers at all: question-looking lines
    assert parse_numbered_list("下面是问题\n郭靖的师父是谁？\n黄蓉的父亲是谁?\n谢谢") == [
        "郭靖的师父是谁？", "黄蓉的父亲是谁?"]
    assert parse_numbered_list("抱歉，我不能回答。") == []
    assert parse_numbered_list("") == []


def test_parse_qa_pairs():
    good = '[{"question": "郭靖的师父是谁？", "answer": "江南七怪。"}]'
    assert parse_qa_pairs(good) == ([{"question": "郭靖的师父是谁？", "answer": "江南七怪。"}], 0)
    assert parse_qa_pairs(f"```json\n{good}\n```")[0][0]["answer"] == "江南七怪。"
    assert parse_qa_pairs(f"好的[注]，结果如下：\n{good}\n以上。")[0][0]["question"] == "郭靖的师父是谁？"
    assert parse_qa_pairs('{"qa": ' + good + "}")[0] == parse_qa_pairs(good)[0]
    assert parse_qa_pairs('{"question": " q ", "answer": " a "}') == ([{"question": "q", "answer": "a"}], 0)
    mixed = ('[{"question": "q1", "answer": "a1"}, {"question": "q2"}, {"question": "", "answer": "a"},'
             ' {"question": 3, "answer": "a"}, "text", {"问题": "q5", "答案": "a5"}]')
    assert parse_qa_pairs(mixed) == ([{"question": "q1", "answer": "a1"}, {"question": "q5", "answer": "a5"}], 4)
    for bad in ["抱歉，我无法输出 JSON。", "[1, 2]", '[{"question": "q"}]', "```json\n[{broken\n```", ""]:
        assert parse_qa_pairs(bad) == ([], 0)


def test_split_chunks_cuts_at_sentence_ends():
    text = "郭靖在蒙古长大。他拜江南七怪为师！后来遇到了黄蓉？“好。”她说。\n第二段开始了。" * 5
    chunks = split_chunks(text, 40)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")  # paragraph breaks inside a chunk stay
    assert "\n第二段" in chunks[0]
    assert all(len(c) <= 40 for c in chunks[:-1]) and len(chunks[-1]) <= 40 * 1.25
    assert all(c[-1] in "。！？”" for c in chunks)
    long = "很" * 250 + "。短句。"
    chunks = split_chunks(long, 100)
    assert [len(c) for c in chunks] == [100, 100, 54]  # a sentence longer than a chunk is cut hard
    assert [len(c) for c in split_chunks("很" * 99 + "。短。", 100)] == [102]  # a short tail joins the chunk before
    assert split_chunks("", 100) == [] and split_chunks("  \n\n ", 100) == []


def test_normalize_and_jaccard():
    assert normalize_question("  郭靖的ＡＢＣ师父，是谁？ ") == "郭靖的abc师父是谁"
    assert bigrams("郭靖是") == {"郭靖", "靖是"} and bigrams("郭") == {"郭"}
    assert jaccard(bigrams("郭靖的师父是谁"), bigrams("黄蓉的师父是谁")) == pytest.approx(4 / 8)


def test_deduper_near_duplicates():
    d = Deduper(0.9)
    base = "在射雕英雄传中，郭靖在蒙古学艺时的第一位师父是谁？"
    assert d.add(base)
    assert not d.add(base)
    assert not d.add("在《射雕英雄传》中 , 郭靖在蒙古学艺时的第一位师父是谁?")  # punctuation/spaces/half-width
    assert not d.add("＂在射雕英雄传中，郭靖在蒙古学艺时的第一位师父是谁？＂")  # full-width forms
    assert not d.add(base.replace("？", "呢？"))  # one extra character: Jaccard 23/24
    assert d.add("黄蓉的父亲是谁？") and d.add("郭靖的师父是谁？")
    assert not d.add("？！")  # nothing left after normalisation
    loose = Deduper(0.5)
    assert loose.add("郭靖的师父是谁") and not loose.add("黄蓉的师父是谁")  # Jaccard 0.5
    exact_only = Deduper(1.01)
    assert exact_only.add(base) and exact_only.add(base.replace("？", "呢？")) and not exact_only.add(base + "  ")


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_deduper_prefix_filter_matches_brute_force(threshold):
    rng = random.Random(threshold)
    words = ["郭靖", "黄蓉", "的", "师父", "是", "谁", "在", "哪里", "武功", "降龙", "十八掌", "为什么", "华山", "呢"]
    base = ["".join(rng.choices(words, k=rng.randint(2, 16))) for _ in range(80)]
    questions = list(base)
    for q in base * 3:  # variants: a word inserted or replaced somewhere
        i = rng.randint(0, len(q))
        questions.append(q[:i] + rng.choice([*words, ""]) + q[i + rng.randint(0, 2):])
    d, kept = Deduper(threshold), []
    for q in questions:
        g, norm = bigrams(normalize_question(q)), normalize_question(q)
        new = bool(norm) and all(norm != normalize_question(k) and jaccard(g, bigrams(normalize_question(k)))
                                 < threshold for k in kept)
        assert d.add(q) == new, q
        if new:
            kept.append(q)
    assert 0 < len(kept) < len(questions) - 20


def test_backoff_delay_bounds():
    for attempt in range(8):
        d = min(0.5, 0.05 * 2 ** attempt)
        for _ in range(20):
            assert d / 2 <= backoff_delay(attempt, 0.05, 0.5) <= d
    assert backoff_delay(0, 0.01, 0.5, retry_after=0.3) == 0.3
    assert backoff_delay(0, 0.01, 0.5, retry_after=60) == 0.5


# ----------------------------------------------------------------------------- against the fake server

def test_questions_answers_passages_end_to_end(api, tmp_path):
    titles = ["天龙八部", "射雕英雄传", "笑傲江湖"]
    api.inject("“射雕英雄传”，从“情节”", faults=("429", "500"))
    api.inject("“笑傲江湖”，从“人物关系”", faults=("timeout", "junk"))
    api.inject("“天龙八部”，从“其他”", forever="500")  # more 500s than retries: this item fails
    opts = options(api, timeout=0.3)
    questions_path = tmp_path / "questions.jsonl"
    s = generate_questions(titles, questions_path, 8, options=opts, progress=False)
    rows = read(questions_path)
    expected = {(t, a, fake_question(t, a, i)) for t in titles for a in ASPECTS for i in (1, 2)
                if (t, a) != ("天龙八部", "其他")}
    got = [(r["title"], r["aspect"], r["question"]) for r in rows]
    assert len(got) == len(set(got)) and set(got) == expected  # junk lines dropped, nothing lost or repeated
    assert all(split_key(r["key"])[0] == f"{r['title']}|{r['aspect']}" for r in rows)
    assert (s.done, s.written, s.failed, s.skipped, s.duplicates) == (11, 22, 1, 0, 0)
    assert s.failures[0].startswith("天龙八部|其他: HTTP 500")
    assert s.retries >= 7  # 429, 500, time-out, junk, 3 x 500
    assert_tokens(s, api)
    assert "1 failed" in format_summary(s) and "rerun the same command" in format_summary(s)

    # answers: one per question, other fields kept
    picked = [r["question"] for r in rows[:3]]
    api.inject(picked[0], faults=("timeout",))
    api.inject(picked[1], faults=("429", "429"))
    api.inject(picked[2], faults=("empty",))
    answers_path = tmp_path / "answers.jsonl"
    s = generate_answers(questions_path, answers_path, options=opts, progress=False)
    answers = read(answers_path)
    assert sorted(r["question"] for r in answers) == sorted(r["question"] for r in rows)
    assert all(r["answer"] == fake_answer(r["question"]) for r in answers)
    by_question = {r["question"]: r for r in rows}
    assert all(a["title"] == by_question[a["question"]]["title"] and a["key"] == by_question[a["question"]]["key"]
               for a in answers)
    assert (s.done, s.written, s.failed, s.skipped) == (22, 22, 0, 0) and s.retries >= 4

    # passages: grounded Q&A per chunk, as JSON
    docs = ["郭靖在蒙古长大，拜江南七怪为师。后来他遇到了洪七公，学会了降龙十八掌。黄蓉是桃花岛主黄药师的女儿。"
            "两人在华山论剑时重逢！谁会是天下第一？",
            "令狐冲是华山派大弟子。他在思过崖遇到风清扬，学会了独孤九剑。任盈盈是日月神教任我行的女儿。",
            "令狐冲是华山派大弟子。他在思过崖遇到风清扬，学会了独孤九剑。任盈盈是日月神教任我行的女儿。"]
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d, "source": "x.txt"}, ensure_ascii=False) for d in docs) + "\n",
                      encoding="utf-8")
    chunks = [(f"train.jsonl:{n}", c) for n, d in enumerate(docs[:2], 1) for c in split_chunks(d, 40)]
    assert len(chunks) >= 4
    api.inject(chunks[0][1], faults=("junk",))
    api.inject(chunks[2][1], forever="junk")  # never valid JSON: failed, nothing written
    passages_path = tmp_path / "passages.jsonl"
    s = generate_passage_qa(corpus, passages_path, 40, 2, options=opts, progress=False)
    got = [(r["question"], r["answer"], r["source"], r["chunk"], r["key"]) for r in read(passages_path)]
    expected = [(fake_passage_question(c, i), c[:12], src, c, f"{chunk_key(c)}#{i}/2")
                for k, (src, c) in enumerate(chunks) if k != 2 for i in range(2)]
    assert sorted(got) == sorted(expected)
    n_done = len(chunks) - 1
    assert (s.done, s.written, s.failed, s.rejected) == (n_done, 2 * n_done, 1, n_done)
    assert s.duplicates == len(split_chunks(docs[2], 40))  # the repeated document
    assert s.failures[0].startswith(chunk_key(chunks[2][1]) + ": no valid answer in 4 tries")


def test_resume_after_fatal_error_and_cut_off_line(api, tmp_path):
    questions = [f"问题{md5(str(i))[:10]}是什么？" for i in range(12)]
    qpath = write_questions(tmp_path / "q.jsonl", questions)
    out = tmp_path / "a.jsonl"
    api.fail_after = (5, "401")  # the key is revoked partway
    with pytest.raises(APIFatalError, match=f"HTTP 401 .*{KEY_ENV}"):
        generate_answers(qpath, out, options=options(api, concurrency=3), progress=False)
    first = read(out)
    assert len(first) == api.good and 5 <= len(first) < 12

    api.fail_after = None
    s = generate_answers(qpath, out, options=options(api, concurrency=3), progress=False)
    assert (s.skipped, s.done) == (len(first), 12 - len(first))
    rows = read(out)
    assert sorted(r["question"] for r in rows) == sorted(questions)

    # a kill in the middle of writing the last line (even inside a UTF-8 character)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2 + 1])
    before = api.requests
    s = generate_answers(qpath, out, options=options(api), progress=False)
    assert (s.skipped, s.done, api.requests - before) == (11, 1, 1)
    rows = read(out)  # every line parses again
    assert sorted(r["question"] for r in rows) == sorted(questions)
    assert all(r["answer"] == fake_answer(r["question"]) for r in rows)

    # a bad line that is not the last one is the user's to fix, not ours to drop
    out.write_text("{oops\n" + out.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(out))}:1:"):
        generate_answers(qpath, out, options=options(api), progress=False)


def test_resume_after_sigkill(api, tmp_path):
    questions = [f"第{i}问：{md5(str(i))[:10]}是什么？" for i in range(20)]
    qpath = write_questions(tmp_path / "q.jsonl", questions)
    out = tmp_path / "a.jsonl"
    code = ("import sys\n"
            "from miniglm.sft.client import ClientOptions\n"
            "from miniglm.sft.synth import generate_answers\n"
            f"opts = ClientOptions(base_url=sys.argv[3], model='m', api_key_env='{KEY_ENV}', concurrency=2)\n"
            "generate_answers(sys.argv[1], sys.argv[2], options=opts, progress=False)\n")
    api.delay = 0.05
    proc = subprocess.Popen([sys.executable, "-c", code, str(qpath), str(out), api.url],
                            cwd=Path(__file__).resolve().parents[1], env=dict(os.environ))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_first = out.read_bytes().count(b"\n")
    assert 4 <= n_first < 20
    api.delay = 0.0
    s = generate_answers(qpath, out, options=options(api), progress=False)
    assert (s.skipped, s.done) == (n_first, 20 - n_first)
    rows = read(out)
    assert sorted(r["question"] for r in rows) == sorted(questions)
    assert all(r["answer"] == fake_answer(r["question"]) for r in rows)


def test_questions_resume_redoes_a_cut_short_group(api, tmp_path):
    out = tmp_path / "q.jsonl"
    titles = ["天龙八部", "神雕侠侣"]
    generate_questions(titles, out, 8, options=options(api), progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 16
    # killed between two lines of one group: the file ends cleanly but that group is incomplete
    out.write_bytes(b"".join(lines[:-1]) + b'{"title": "\xe5')
    before = api.requests
    s = generate_questions(titles, out, 8, options=options(api), progress=False)
    assert (s.skipped, s.done, s.written, api.requests - before) == (7, 1, 2, 1)
    got = [(r["title"], r["aspect"], r["question"]) for r in read(out)]
    assert sorted(got) == sorted((t, a, fake_question(t, a, i)) for t in titles for a in ASPECTS for i in (1, 2))
    # nothing left to do: no request at all
    before = api.requests
    s = generate_questions(titles, out, 8, options=options(api), progress=False)
    assert (s.skipped, s.done, api.requests) == (8, 0, before)


def test_near_duplicate_questions_dropped_within_and_across_runs(api, tmp_path):
    base = "在射雕英雄传中，郭靖在蒙古学艺时的第一位师父是谁"
    api.reply_fn = lambda prompt: "\n".join(
        [f"1. {base}？", f"2. {base}呢？", f"3. ＂{base}？＂", "4. 黄蓉的父亲是谁？"])
    out = tmp_path / "q.jsonl"
    s = generate_questions(["射雕英雄传"], out, 4, aspects=["人物介绍"], options=options(api), progress=False)
    assert [r["question"] for r in read(out)] == [f"{base}？", "黄蓉的父亲是谁？"]
    assert (s.written, s.duplicates) == (2, 2) and read(out)[1]["key"] == "射雕英雄传|人物介绍#1/2"
    # a new title whose questions repeat those already in the file: all dropped
    s = generate_questions(["射雕英雄传", "射雕"], out, 4, aspects=["人物介绍"], options=options(api), progress=False)
    assert (s.skipped, s.written, s.duplicates) == (1, 0, 4) and len(read(out)) == 2
    # answers drop repeated input questions before asking
    qpath = write_questions(tmp_path / "in.jsonl", [f"{base}？", f"{base}？", f"{base}呢？", "黄蓉的父亲是谁？"])
    s = generate_answers(qpath, tmp_path / "a.jsonl", options=options(api), progress=False)
    assert (s.done, s.duplicates) == (2, 2)


def test_usage_summary_and_concurrency_limit(api, tmp_path, capsys):
    questions = [f"第{i}个问题：{md5(str(i))[:6]}？" for i in range(9)]
    qpath = write_questions(tmp_path / "q.jsonl", questions)
    api.delay = 0.1
    s = generate_answers(qpath, tmp_path / "a.jsonl", options=options(api, concurrency=3))
    assert_tokens(s, api)
    assert s.done == 9 and 2 <= api.max_inflight <= 3
    assert s.as_dict()["total_tokens"] == s.prompt_tokens + s.completion_tokens
    out = capsys.readouterr().out
    assert f"= {s.total_tokens:,} total in 9 requests" in out and "answers: 9 done" in out


def test_non_retryable_error_stops_at_once(api, tmp_path):
    qpath = write_questions(tmp_path / "q.jsonl", ["郭靖的师父是谁？", "黄蓉的父亲是谁？"])
    api.inject("郭靖", forever="404")
    api.inject("黄蓉", forever="404")
    with pytest.raises(APIFatalError, match=r"HTTP 404 .*--base-url") as e:
        generate_answers(qpath, tmp_path / "a.jsonl", options=options(api, concurrency=1), progress=False)
    assert isinstance(e.value, UserError) and api.requests == 1 and "\n" not in str(e.value)


def test_user_errors(api, tmp_path, monkeypatch):
    qpath = write_questions(tmp_path / "q.jsonl", ["郭靖的师父是谁？"])
    with qpath.open("a", encoding="utf-8") as f:
        f.write('{"question": "broken\n')
    with pytest.raises(UserError, match=f"{re.escape(str(qpath))}:2:"):
        generate_answers(qpath, tmp_path / "a.jsonl", options=options(api), progress=False)
    qpath.write_text('{"question": "ok"}\n{"title": "no question"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(qpath))}:2: .*question"):
        generate_answers(qpath, tmp_path / "a.jsonl", options=options(api), progress=False)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "好。"}\n{"body": "没有 text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(corpus))}:2: no string field 'text'"):
        generate_passage_qa(corpus, tmp_path / "p.jsonl", options=options(api), progress=False)
    with pytest.raises(UserError, match="no such"):
        generate_answers(tmp_path / "missing.jsonl", tmp_path / "a.jsonl", options=options(api), progress=False)
    with pytest.raises(UserError, match="no such"):
        generate_passage_qa(tmp_path / "missing.txt", tmp_path / "p.jsonl", options=options(api), progress=False)
    monkeypatch.delenv(KEY_ENV)
    write_questions(qpath, ["郭靖的师父是谁？"])
    with pytest.raises(UserError, match=f"environment variable {KEY_ENV} is not set"):
        generate_answers(qpath, tmp_path / "a.jsonl", options=options(api), progress=False)
    with pytest.raises(UserError, match=KEY_ENV):
        generate_questions(["天龙八部"], tmp_path / "q2.jsonl", 4, options=options(api), progress=False)
    assert api.requests == 0


def test_cli(api, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="miniglm")
    sft = parser.add_subparsers(dest="command", required=True).add_parser("sft")
    add_sft_generate_parser(sft.add_subparsers(dest="sft_command", required=True))
    for step in ("questions", "answers", "passages"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["sft", "generate", step, "--help"])
        assert e.value.code == 0 and "--base-url" in capsys.readouterr().out
    common = ["--base-url", api.url, "--model", "fake", "--api-key-env", KEY_ENV, "--timeout", "2",
              "--max-retries", "2", "--retry-base-delay", "0.01", "--retry-max-delay", "0.05", "--concurrency", "2"]

    def run(*argv: str) -> int:
        args = parser.parse_args(["sft", "generate", *argv, *common])
        return args.func(args)

    titles = tmp_path / "titles.txt"
    titles.write_text("# 金庸\n天龙八部\n\n射雕英雄传\n", encoding="utf-8")
    q, a, p = tmp_path / "q.jsonl", tmp_path / "a.jsonl", tmp_path / "p.jsonl"
    assert run("questions", "--titles-file", str(titles), "--per-title", "4", "--out", str(q)) == 0
    assert len(read(q)) == 8 and "questions: 8 done" in capsys.readouterr().out
    assert run("questions", "--titles", "天龙八部", "射雕英雄传", "--per-title", "4", "--out", str(q)) == 0
    assert len(read(q)) == 8 and "8 already done" in capsys.readouterr().out
    assert run("answers", "--questions", str(q), "--out", str(a)) == 0
    assert len(read(a)) == 8
    txt = tmp_path / "novel.txt"
    txt.write_text("郭靖在蒙古长大。他拜江南七怪为师。后来遇到了黄蓉。两人一同闯荡江湖。", encoding="utf-8")
    api.inject("两人一同闯荡江湖", forever="junk")
    assert run("passages", "--corpus", str(txt), "--chunk-chars", "16", "--per-chunk", "1", "--out", str(p)) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "tokens:" in out
    assert [r["source"] for r in read(p)] == ["novel.txt"] * 3  # 4 chunks, the last one failed


def test_cli_prompt_templates(api, tmp_path, capsys):
    """--question-prompt / --answer-prompt (text or @FILE) replace the Chinese defaults; bad ones fail up front."""
    parser = argparse.ArgumentParser(prog="miniglm")
    add_sft_generate_parser(parser.add_subparsers(dest="command", required=True))
    common = ["--base-url", api.url, "--model", "fake", "--api-key-env", KEY_ENV, "--system-prompt", "",
              "--max-retries", "1", "--retry-base-delay", "0.01"]
    prompts: list[str] = []

    def reply_en(prompt: str) -> str:
        prompts.append(prompt)
        if prompt.startswith("Ask"):
            return "Sure:\n1. What is the capital of France?\n2. Who wrote Hamlet?"
        return f"Answer to: {prompt.removeprefix('Answer briefly: ')}"

    api.reply_fn = reply_en

    def run(*argv: str) -> int:
        args = parser.parse_args(["generate", *argv, *common])
        return args.func(args)

    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    assert run("questions", "--titles", "Europe", "--per-title", "2", "--aspects", "facts",
               "--question-prompt", "Ask {n} questions about {title} ({aspect}){hint}.", "--out", str(q)) == 0
    assert prompts == ["Ask 2 questions about Europe (facts)."]
    assert [r["question"] for r in read(q)] == ["What is the capital of France?", "Who wrote Hamlet?"]
    (tmp_path / "answer.txt").write_text("Answer briefly: {question}", encoding="utf-8")
    assert run("answers", "--questions", str(q), "--answer-prompt", f"@{tmp_path / 'answer.txt'}", "--out", str(a)) == 0
    assert sorted(r["answer"] for r in read(a)) == ["Answer to: What is the capital of France?",
                                                     "Answer to: Who wrote Hamlet?"]
    for argv, message in [(["questions", "--titles", "x", "--question-prompt", "About {title}"], "needs {n}"),
                          (["questions", "--titles", "x", "--question-prompt", "{n} on {topic}"],
                           "unknown placeholder {topic}"),
                          (["answers", "--questions", str(q), "--answer-prompt", "Say {"], "not a valid template")]:
        with pytest.raises(UserError, match=re.escape(message)):
            run(*argv, "--out", str(tmp_path / "x.jsonl"))
    assert len(prompts) == 3 and not (tmp_path / "x.jsonl").exists()
