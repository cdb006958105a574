import json
import math

import pytest
import torch
import torch.nn.functional as F

from miniglm.cli import main
from miniglm.evaluate import Example, majority_baseline, perplexity
from miniglm.fileio import write_jsonl
from miniglm.model import MiniGLM, ModelConfig
from miniglm.tokenizer import load_tokenizer

from .conftest import chat_run_fixture

run_dir = chat_run_fixture(block_size=64, n_layer=1)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "test.jsonl"
    rows = [{"question": f"{name}的师父是谁？", "answer": master, "fact": "师父"}
            for name, master in [("司徒沧霄", "李龙鹏"), ("伍尘淑", "张三丰"), ("罗鹏", "李龙鹏")]]
    rows += [{"question": "罗鹏是哪个门派的？", "answer": "华山派", "fact": "门派"}]
    write_jsonl(path, rows)
    return path


@torch.inference_mode()
def test_sliding_window_perplexity_matches_token_by_token(bpe_dir):
    """With stride 1 every token is scored with all the context the window allows: check against a
    brute-force loop that scores each token alone with exactly that context."""
    tok = load_tokenizer(bpe_dir)
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    texts = ["司徒沧霄与蔡尘淑是至交好友。司徒沧霄惯用的兵器是雪影杖。", "伍尘淑祖籍杭州。"]
    ids = [i for t in texts for i in tok.encode(t) + [tok.eot_id]]
    assert len(ids) > 2 * 16
    nll = 0.0
    for i in range(1, len(ids)):
        context = ids[max(0, i - 16):i]
        logits, _ = model(torch.tensor([context]))
        nll += F.cross_entropy(logits[0, -1:], torch.tensor([ids[i]])).item()
    got = perplexity(model, tok, texts, stride=1)
    assert got["tokens"] == len(ids) - 1
    # Windows batched against one context at a time: other shapes, other float32 summation orders (and BLAS
    # kernels, which differ between CPUs) in each token's loss (~6). Relative already: measured ~2e-9 of it
    # (the errors average out over the tokens); rel=1e-5 is ~80 float32 roundings of one token's loss.
    assert got["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)
    # Every stride scores each token once; a larger stride gives less context, so no better a loss.
    half = perplexity(model, tok, texts)
    assert half["tokens"] == len(ids) - 1 and half["stride"] == 8
    whole = perplexity(model, tok, texts, stride=16)
    assert whole["tokens"] == len(ids) - 1


def test_eval_writes_predictions_metrics_and_reports(run_dir, qa_file, capsys):
    assert main(["eval", "--run", str(run_dir), "--data", str(qa_file), "--max-new-tokens", "6",
                 "--embedder", "none"]) == 0
    out = run_dir / "eval"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and preds[0]["reference"] == "李龙鹏" and preds[0]["fact"] == "师父"
    assert {"exact_match", "contained", "rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(preds[0]["scores"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["n"] == 4 and summary["group_by"] == "fact" and set(summary["groups"]) == {"师父", "门派"}
    mean_em = sum(p["scores"]["exact_match"] for p in preds) / 4
    assert summary["all"]["exact_match"] == pytest.approx(mean_em)  # a mean of 0/1 in float64: approx's rel=1e-6
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page  # self-contained
    assert "rouge-l" in (out / "report.md").read_text()
    assert "4 samples" in capsys.readouterr().out

    # The report rebuilds from the files alone; two runs compare side by side.
    (out / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0 and (out / "report.md").exists()
    assert main(["report", str(run_dir), str(run_dir)]) == 0
    assert "B - A" in (out / f"compare-{run_dir.name}.md").read_text()


def test_empty_predictions_score_zero(run_dir, qa_file, tmp_path):
    """max 0 new tokens: every prediction is empty, and every score is 0 rather than an error."""
    assert main(["eval", "--run", str(run_dir), "--data", str(qa_file), "--max-new-tokens", "0",
                 "--out", str(tmp_path), "--embedder", "use-multilingual"]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert all(v == 0 for v in summary["all"].values())


def test_eval_classify(run_dir, tmp_path):
    data = tmp_path / "cls.jsonl"
    write_jsonl(data, [{"question": f"评论：{t}\n情感：", "answer": a}
                       for t, a in [("房间很干净", "正面"), ("服务太差", "负面"), ("早餐不错", "正面")]])
    assert main(["eval", "classify", "--run", str(run_dir), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert summary["labels"] == ["正面", "负面"] and summary["n"] == 3
    # ratios of counts in float64 (JSON round-trips them exactly): approx's rel=1e-6 for how 2/3 is formed
    assert summary["majority_baseline"] == {"label": "正面", "accuracy": pytest.approx(2 / 3)}
    preds = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prediction"] in ("正面", "负面", "") for p in preds)
    assert summary["accuracy"] == pytest.approx(sum(p["prediction"] == p["reference"] for p in preds) / 3)
    assert (tmp_path / "e" / "report.html").exists()


def test_eval_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main(["eval", "--run", str(run_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", "--run", str(run_dir)]) == 2
    assert main(["eval", "ppl", "--run", str(run_dir), "--text", str(tmp_path / "nope.txt")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("miniglm: error:") == 4 and "Traceback" not in err


def test_eval_ppl_cli(run_dir, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text("司徒沧霄与蔡尘淑是至交好友。" * 20, encoding="utf-8")
    assert main(["eval", "ppl", "--run", str(run_dir), "--text", str(text), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "perplexity.json").read_text())
    # math.exp of the very float64 loss written beside it (JSON round-trips floats): equal; approx's rel=1e-6
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"])) and result["bits_per_byte"] > 0


def test_majority_baseline_answers_the_most_frequent_value_per_group():
    train = [Example([], [a], {"fact": f}) for a, f in [("华山派", "门派"), ("华山派", "门派"), ("少林派", "门派"),
                                                          ("李龙鹏", "师父")]]
    test = [Example([], ["少林派"], {"fact": "门派"}), Example([], ["张三丰"], {"fact": "师父"}),
            Example([], ["1199"], {"fact": "出生年"})]
    assert majority_baseline(train, test, "fact") == ["华山派", "李龙鹏", "华山派"]  # unknown group: overall


def test_sampled_eval_repeats_with_its_seed(run_dir, qa_file, tmp_path):
    def predictions(seed: int, out: str) -> list[str]:
        assert main(["eval", "--run", str(run_dir), "--data", str(qa_file), "--max-new-tokens", "8", "--embedder",
                     "none", "--temperature", "1.0", "--seed", str(seed), "--out", str(tmp_path / out)]) == 0
        lines = (tmp_path / out / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    first = predictions(3, "a")
    assert predictions(3, "b") == first
    assert predictions(4, "c") != first


def test_fitted_prompt_drops_oldest_turns_first():
    from types import SimpleNamespace

    from miniglm.chat import LoadedRun

    run = SimpleNamespace(prompt=lambda msgs: (list("".join(m["content"] for m in msgs)), [0]))  # a token a char

    def fitted(chat, n, keep_end=False):
        return LoadedRun.fitted(run, chat, n, keep_end)
    chat = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
            {"role": "user", "content": "c" * 8}]
    assert fitted(chat, 30) == (list("a" * 10 + "b" * 10 + "c" * 8), [0], False)
    assert fitted(chat, 12) == (list("c" * 8), [0], True)  # the old turn goes, the question stays
    assert fitted(chat, 5) == (list("c" * 5), [0], True)  # then the question's end
    chat[-1]["content"] = "cd" * 4
    assert fitted(chat, 3, keep_end=True) == (list("dcd"), [0], True)  # a chat keeps the text's end
