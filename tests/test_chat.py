import json

from miniglm.chat import chat_repl, load_run
from miniglm.cli import main
from miniglm.engine import SamplingParams

from .conftest import chat_run_fixture

run_dir = chat_run_fixture(block_size=64, n_layer=1, scope="function")


def test_generate_cli(run_dir, tmp_path, capsys):
    assert main(["generate", "--run", str(run_dir), "--prompt", "你好", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    (tmp_path / "prompts.txt").write_text("天下大势\n\n司徒沧霄是谁？\n江湖\n", encoding="utf-8")
    assert main(["generate", "--run", str(run_dir), "--file", str(tmp_path / "prompts.txt"), "--jsonl",
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["天下大势", "司徒沧霄是谁？", "江湖"]
    assert all(r["completion_tokens"] <= 6 for r in rows)
    # batched outputs equal one-at-a-time outputs (greedy)
    for r in rows:
        main(["generate", "--run", str(run_dir), "--prompt", r["prompt"], "--max-new-tokens", "6", "--jsonl"])
        assert json.loads(capsys.readouterr().out)["output"] == r["output"]



def test_keep_special_flag():
    from miniglm.cli import _sampling, build_parser

    for argv in (["generate", "--prompt", "x"], ["chat"], ["eval"]):
        args = build_parser().parse_args([*argv, "--run", "r"])
        assert _sampling(args).skip_special_tokens  # special tokens are left out by default
        assert not _sampling(build_parser().parse_args([*argv, "--run", "r", "--keep-special"])).skip_special_tokens

def test_generate_uses_the_run_template(run_dir):
    run = load_run(run_dir)
    ids, stops = run.prompt([{"role": "user", "content": "你好"}])
    tok = run.engine.tokenizer
    assert ids[-1] == tok.special("<|assistant|>") and stops == [tok.special("<|end|>")]
    raw = load_run(run_dir, raw=True)
    assert raw.prompt([{"role": "user", "content": "你好"}])[0] == tok.encode("你好")


def test_chat_repl_commands(run_dir):
    run = load_run(run_dir)
    inputs = iter(["你好", "/system 你是侠客", "他是谁？", "/reset", "", "再见", "/exit"])
    out: list[str] = []
    prompts: list[list[int]] = []
    stream = run.engine.stream
    run.engine.stream = lambda ids, params: (prompts.append(ids), stream(ids, params))[1]
    chat_repl(run, SamplingParams(max_new_tokens=4), read=lambda _: next(inputs), write=out.append)
    text = "".join(out)
    assert "(system prompt set; history cleared)" in text and "(history cleared)" in text
    tok = run.engine.tokenizer
    assert len(prompts) == 3
    assert tok.special("<|system|>") in prompts[1] and tok.special("<|system|>") in prompts[2]
    assert tok.decode(prompts[2]).count("<|user|>") == 1  # /reset dropped the earlier turns


def test_generate_missing_file(run_dir, capsys):
    assert main(["generate", "--run", str(run_dir), "--file", "nope.txt"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err


def test_default_new_tokens_fit_the_context(run_dir, tmp_path, capsys):
    """A 64-token context: the default (128) and an explicit 500 are capped at the room each prompt leaves;
    only the explicit value gets a note on stderr."""
    prompt = "司徒沧霄的师父是谁？"
    assert main(["generate", "--run", str(run_dir), "--prompt", prompt, "--jsonl"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)
    assert row["completion_tokens"] > 0 and row["prompt_tokens"] + row["completion_tokens"] <= 64
    assert "note" not in out.err
    assert main(["generate", "--run", str(run_dir), "--prompt", prompt, "--jsonl", "--max-new-tokens", "500"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["output"] == row["output"]
    assert out.err.count("miniglm: note: --max-new-tokens 500") == 1


def test_chat_drops_oldest_turns_before_the_room_gets_small(run_dir):
    run = load_run(run_dir)
    lines = iter(["天下大势，分久必合", "滚滚长江东逝水", "是非成败转头空", "青山依旧在", "/exit"])
    prompts: list[list[int]] = []
    stream = run.engine.stream
    run.engine.stream = lambda ids, params: (prompts.append(ids), stream(ids, params))[1]
    out: list[str] = []
    chat_repl(run, SamplingParams(max_new_tokens=128, fit_new_tokens=True), read=lambda _: next(lines),
              write=out.append)
    assert len(prompts) == 4  # every message answered, none refused
    assert all(64 - len(p) >= 32 for p in prompts)  # room for half the context at least
    assert run.engine.tokenizer.decode(prompts[-1]).count("<|user|>") < 4  # older turns were dropped


def test_eval_answers_do_not_depend_on_the_batch(run_dir, tmp_path):
    from miniglm.evaluate import Example, answer

    run = load_run(run_dir)
    questions = ["你好", "司徒沧霄的师父是谁？" * 3, "江湖", "天下大势，分久必合" * 4, "谁？", "一壶浊酒", "剑", "刀"]
    examples = [Example([{"role": "user", "content": q}], ["x"]) for q in questions]
    params = SamplingParams(max_new_tokens=128)
    assert answer(run, examples, params, batch_size=1) == answer(run, examples, params, batch_size=8)


def test_compile_without_a_cpp_compiler_is_one_line(run_dir, capsys, monkeypatch):
    """--compile on CPU builds C++: with no compiler, one line and exit 2 before any decoding, not
    inductor's pages of traceback at the first step. --device cpu: on CUDA --compile needs no C++ compiler."""
    from torch._inductor import cpp_builder

    def missing():
        raise RuntimeError("No working C++ compiler found")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    assert main(["generate", "--run", str(run_dir), "--prompt", "你好", "--compile", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--compile needs a C++ compiler" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_bad_line_typed_into_chat_is_named_by_its_number(run_dir, capsys, monkeypatch):
    """Undecodable bytes on the second line typed: the error says stdin:2 (it said stdin:1)."""
    import io
    import sys

    typed = "你好\n".encode() + "你好\n".encode("gbk")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    assert main(["chat", "--run", str(run_dir), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "stdin:2: not UTF-8" in capsys.readouterr().err


def test_trim_prompt_keeps_the_template_and_the_system_prompt(run_dir):
    """--trim-prompt on a message past the context cuts the start of its text, never the template's own
    tokens nor the system prompt (it cut the rendered ids' start: the role tokens and the system text)."""
    from miniglm.chat import generate_texts

    run = load_run(run_dir, "cpu")
    system = {"role": "system", "content": "你是江湖百晓生"}
    params = SamplingParams(max_new_tokens=8, trim_prompt=True)
    long_text = "天下大势，分久必合，合久必分。" * 20 + "最后一句"
    out = next(generate_texts(run, [long_text], params, system=system["content"]))
    ids, _, cut = run.fitted([system, {"role": "user", "content": long_text}], run.room(params), keep_end=True)
    assert cut and out["prompt_tokens"] == len(ids) <= run.room(params)
    frame = run.prompt([system, {"role": "user", "content": ""}])[0]  # all the template and system prompt add
    same_start = next(i for i, (a, b) in enumerate(zip(frame, ids, strict=False)) if a != b)
    same_end = next(i for i, (a, b) in enumerate(zip(frame[::-1], ids[::-1], strict=False)) if a != b)
    assert same_start + same_end == len(frame)  # the frame whole around what is left of the text
    assert run.engine.tokenizer.decode(ids[same_start:len(ids) - same_end]).endswith("最后一句")
