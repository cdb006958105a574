"""Classification as generation on seed 002's data sets, through the benches' own functions at a tiny size:
one RAFT cross-validation fold (a tiny GPT-2, and a MiniGLM as the demo's), and the ChnSentiCorp
generate-then-check pipeline on a few rows."""

import sys
from pathlib import Path

import pytest
import torch

from miniglm.cli import main
from miniglm.fileio import read_jsonl
from miniglm.sft.templates import IGNORE

from .conftest import SHARED_DATA, shared_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chnsenticorp  # noqa: E402
import raft_cv  # noqa: E402

RAFT = SHARED_DATA / "classify" / "raft_twitter_complaints"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    shared_file(RAFT / "train.csv")
    return raft_cv.tiny_gpt2(tmp_path_factory.mktemp("tiny"), raft_cv.tweets(), vocab_size=400, n_embd=32)


def test_stratified_folds():
    labels = ["a"] * 33 + ["b"] * 17
    folds = raft_cv.stratified_folds(labels, 5, 1)
    assert sorted(i for f in folds for i in f) == list(range(50)) and {len(f) for f in folds} == {10}
    assert all(sum(labels[i] == "b" for i in f) in (3, 4) for f in folds)
    assert folds == raft_cv.stratified_folds(labels, 5, 1) != raft_cv.stratified_folds(labels, 5, 2)


def _prompt_and_target(row: dict, tok) -> tuple[str, list[int]]:
    trained = [i for i, lab in enumerate(row["labels"]) if lab != IGNORE]
    assert trained == list(range(trained[0], len(row["ids"])))  # -100 on the whole prompt, then the target
    return tok.decode(row["ids"][:trained[0]]), row["ids"][trained[0]:]


def test_raft_fold_with_a_tiny_gpt2(tmp_path, tiny):
    result = raft_cv.cross_validate("tiny", tmp_path, steps=3, folds=1, tiny=tiny)
    assert result["rows"] == 50 and result["majority_overall"] == 0.66 and len(result["folds"]) == 1
    fold = result["folds"][0]
    assert fold["n_test"] == 10 and 0 <= fold["accuracy"] <= 1 and fold["majority_label"] == "no complaint"
    # majority: 6 of 10 in float64 (approx for 6/10 vs 0.6); the mean of one fold is that fold's value exactly
    assert fold["majority"] == pytest.approx(0.6) and result["mean"] == fold["accuracy"]
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "tiny-fold0" / "run" / "tokenizer")
    for _, row in read_jsonl(tmp_path / "tiny-fold0" / "run" / "data" / "train.jsonl"):
        prompt, target = _prompt_and_target(row, tok)
        assert prompt.startswith("Tweet text : ") and prompt.endswith(" Label : ")
        assert tok.decode(target[:-1]) in raft_cv.LABELS and target[-1] == tok.eot_id


def test_raft_long_tweets_lose_their_end_never_the_label(tmp_path, tiny):
    """`sft prepare` on the real file (columns from its task.json): cut to 40 tokens, every record keeps
    "Tweet text : " + the start of the tweet + " Label : " + the whole label."""
    assert main(["sft", "prepare", "--data", str(RAFT / "train.csv"), "--tokenizer", str(tiny), "--template",
                 "plain", "--max-len", "40", "--val-fraction", "0", "--out", str(tmp_path / "d")]) == 0
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny)
    rows = [r for _, r in read_jsonl(tmp_path / "d" / "train.jsonl")]
    meta = raft_cv.read_json(tmp_path / "d" / "meta.json")
    assert len(rows) == 50 and meta["truncated"] > 10 and meta["dropped"] == 0
    for row in rows:
        prompt, target = _prompt_and_target(row, tok)
        assert len(row["ids"]) <= 40 and prompt.startswith("Tweet text : ") and prompt.endswith(" Label : ")
        assert tok.decode(target[:-1]) in raft_cv.LABELS


def test_raft_fold_with_a_minglm_like_the_demo(tmp_path, bpe_dir):
    """The demo path (`sft prepare --template plain` + `train` from DEMO/pretrain + `eval classify`) on a
    random MiniGLM with a 48-token context: eval cuts long tweets as training did, instead of failing."""
    from miniglm.checkpoint import save_checkpoint
    from miniglm.config import TrainConfig, save_config
    from miniglm.model import MiniGLM, ModelConfig
    from miniglm.tokenizer import load_tokenizer

    shared_file(RAFT / "train.csv")
    demo = tmp_path / "demo"
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(vocab_size=400, block_size=48, n_layer=1, n_head=2, n_embd=32))
    model = MiniGLM(cfg.model)
    save_checkpoint(demo / "pretrain" / "ckpt", model, model.config, {"step": 1})
    save_config(cfg, demo / "pretrain" / "config.toml")
    load_tokenizer(bpe_dir).save(demo / "tokenizer")
    result = raft_cv.cross_validate("demo", tmp_path, steps=2, folds=1, demo=demo)
    # 6 of 10 test rows in float64 (approx for 6/10 vs 0.6)
    assert 0 <= result["folds"][0]["accuracy"] <= 1 and result["folds"][0]["majority"] == pytest.approx(0.6)
    chat = (tmp_path / "demo-fold0" / "run" / "chat.json").read_text()
    assert '"prompt_field": "Tweet text"' in chat and '"label_field": "Label"' in chat
    assert len(list(read_jsonl(tmp_path / "demo-fold0" / "eval" / "predictions.jsonl"))) == 10


def test_chnsenticorp_pipeline_shape(tmp_path):
    rows = [r for r in raft_cv.read_csv(shared_file(chnsenticorp.HOTEL))[1] if r["review"].strip()][:60]
    r = chnsenticorp.pipeline(tmp_path, rows, gen_steps=2, cls_steps=2, n=2, seed=1, test_limit=8,
                              model_size={"n_layer": 1, "n_embd": 32})
    assert r["train"] == 48 and r["test"] == 8 and r["real"]["n"] == 8
    assert [s["label"] for s in r["samples"]] == ["1", "1", "0", "0"]
    assert r["generated"]["n"] == 4 - r["empty"] and set(r["per_label"]) == {"正面", "负面"}
    meta = next(read_jsonl(tmp_path / "generator" / "data" / "train.jsonl"))[1]
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "generator" / "tokenizer")
    prompt = tok.decode(meta["ids"][:next(i for i, x in enumerate(meta["labels"]) if x != IGNORE)])
    assert prompt.replace(" ", "") in ("label:正面review:", "label:负面review:")
