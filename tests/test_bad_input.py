"""Every command, given bad input, fails in one line: a non-zero exit, a last stderr line "miniglm: error: ..."
naming the file (and line or record) or the flag, no traceback, the inputs untouched, no output left behind.

Run in-process through miniglm.cli.main, one table row per case; {NAME} in an argument is a path below.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from miniglm.cli import main
from tests.conftest import make_chat_run

TINY = ("--set model.n_layer=1 --set model.n_head=2 --set model.n_embd=32 --set model.block_size=8 "
        "--set model.vocab_size=400 --set batch_size=2 --set max_steps=1 --set eval_batches=1 --set threads=1")
GBK_QA = '{"question": "张三的师父是谁？", "answer": "李四"}\n'
GBK_JSONL = r"gbk.jsonl:1: not UTF-8 at byte 14 .*--encoding gbk reads it"
# (id, argv, text the last stderr line must hold): the file, line or record, or the flag
CASES = [
    # corpus prepare
    ("prepare-gbk-jsonl", "corpus prepare {gbk_jsonl} --out {out}",
     r"gbk.jsonl:1: not UTF-8 at byte 14 .*--encoding gbk"),
    ("prepare-missing", "corpus prepare {root}/nope.txt --out {out}", "nope.txt: no such file"),
    ("prepare-val-negative", "corpus prepare {gbk_txt} --out {out} --val-fraction -1", "--val-fraction"),
    ("prepare-val-one", "corpus prepare {gbk_txt} --out {out} --val-fraction 1", "--val-fraction"),
    ("prepare-utf16-no-bom", "corpus prepare {utf16_txt} --out {out}", "utf16.txt: .*--encoding utf-16-le"),
    ("prepare-unknown-encoding", "corpus prepare {gbk_txt} --out {out} --encoding klingon", "--encoding klingon"),
    ("prepare-wrong-encoding", "corpus prepare {gbk_txt} --out {out} --encoding utf-8", "gbk.txt: not valid utf-8"),
    ("prepare-empty", "corpus prepare {empty_txt} --out {out}", "empty.txt: the file is empty"),
    ("prepare-bad-regex", "corpus prepare {gbk_txt} --out {out} --encoding gbk --drop (", "--drop"),
    ("prepare-bad-line", "corpus prepare {bad_jsonl} --out {out}", "bad.jsonl:2"),
    # corpus tokenize
    ("tokenize-missing-corpus", "corpus tokenize --corpus {root}/nope --tokenizer {bpe} --out {out}", "train.jsonl"),
    ("tokenize-gbk-corpus", "corpus tokenize --corpus {gbk_corpus} --tokenizer {bpe} --out {out}",
     r"gbk_corpus/train.jsonl:1: not UTF-8 at byte \d+ .*iconv -f gbk"),
    ("tokenize-bad-val", "corpus tokenize --corpus {bad_val_corpus} --tokenizer {bpe} --out {out}", "val.jsonl:2"),
    ("tokenize-missing-tokenizer", "corpus tokenize --corpus {corpus} --tokenizer {root}/nope --out {out}", "nope"),
    # tokenizer train / report
    ("tok-train-vocab-small", "tokenizer train --corpus {corpus} --vocab-size 10 --out {out}", "--vocab-size"),
    ("tok-train-vocab-abc", "tokenizer train --corpus {corpus} --vocab-size abc --out {out}", "--vocab-size"),
    ("tok-train-min-freq", "tokenizer train --corpus {corpus} --min-frequency 0 --out {out}", "--min-frequency"),
    ("tok-train-missing", "tokenizer train --corpus {root}/nope --out {out}", "nope/train.jsonl: no such file"),
    ("tok-train-gbk", "tokenizer train --corpus {gbk_corpus} --out {out}", "gbk_corpus/train.jsonl:1: not UTF-8"),
    ("tok-report-missing-tok", "tokenizer report --tokenizer {root}/nope --corpus {corpus}", "nope"),
    ("tok-report-gbk", "tokenizer report --tokenizer {bpe} --corpus {gbk_corpus}", "gbk_corpus/val.jsonl:1: not UTF-8"),
    ("tok-report-missing-split", "tokenizer report --tokenizer {bpe} --corpus {root}/nope", "nope/val.jsonl"),
    # world
    ("world-characters-0", "world --out {out} --characters 0", "--characters"),
    ("world-characters-3", "world --out {out} --characters 3", "--characters"),
    ("world-bios-0", "world --out {out} --bios 0", "--bios"),
    ("world-heldout-1", "world --out {out} --heldout-fraction 1", "--heldout-fraction"),
    ("world-characters-abc", "world --out {out} --characters abc", "--characters"),
    # demo: every number and --set is checked before the first stage writes
    ("demo-characters-0", "demo --out {out} --characters 0", "--characters"),
    ("demo-vocab-10", "demo --out {out} --vocab-size 10", "--vocab-size"),
    ("demo-questions-0", "demo --out {out} --questions 0", "--questions"),
    ("demo-set-batch", "demo --out {out} --set batch_size=-4", "batch_size must be at least 1, got -4"),
    ("demo-set-pretrain-layer", "demo --out {out} --set-pretrain model.n_layer=abc", "model.n_layer"),
    ("demo-set-sft-eval", "demo --out {out} --set-sft eval_every=0", "eval_every"),
    # train
    ("train-batch-negative", "train --set data={data} --set out_dir={out} --set batch_size=-4", "batch_size"),
    ("train-eval-every-0", "train --set data={data} --set out_dir={out} --set eval_every=0", "eval_every"),
    ("train-log-every-0", "train --set data={data} --set out_dir={out} --set log_every=0", "log_every"),
    ("train-grad-accum-0", "train --set data={data} --set out_dir={out} --set grad_accum=0", "grad_accum"),
    ("train-n-layer-abc", "train --set data={data} --set out_dir={out} --set model.n_layer=abc",
     "model.n_layer must be an integer, got 'abc'"),
    ("train-n-head-0", "train --set data={data} --set out_dir={out} --set model.n_head=0", "model.n_head"),
    ("train-dropout", "train --set data={data} --set out_dir={out} --set model.dropout=1.5", "model.dropout"),
    ("train-lr-0", "train --set data={data} --set out_dir={out} --set lr=0", "lr must be greater than 0"),
    # non-finite and degenerate values: refused before any work (lr=inf trained a NaN model with rc 0)
    ("train-lr-inf", "train --set data={data} --set out_dir={out} --set lr=inf", "lr must be a finite number"),
    ("train-rope-inf", "train --set data={data} --set out_dir={out} --set model.rope_theta=inf",
     "model.rope_theta must be a finite number"),
    ("train-max-steps-abc", "train --set data={data} --set out_dir={out} --set max_steps=abc", "max_steps"),
    ("train-unknown-key", "train --set data={data} --set out_dir={out} --set max_step=3", "max_step"),
    ("train-stage", "train --set data={data} --set out_dir={out} --set stage=rl", "stage"),
    ("train-dtype", "train --set data={data} --set out_dir={out} --set dtype=fp16", "dtype"),
    ("train-device", "train --set data={data} --set out_dir={out} --set device=gpu", "device"),
    ("train-set-no-equals", "train --set data={data} --set out_dir={out} --set lr", "--set lr"),
    ("train-no-data", "train --set out_dir={out}", "data"),
    ("train-missing-data", "train --set data={root}/nope --set out_dir={out}", "nope/meta.json"),
    ("train-missing-config", "train --config {root}/nope.toml --set out_dir={out}", "nope.toml: no such"),
    ("train-gbk-config", "train --config {gbk_toml} --set out_dir={out}", "gbk.toml:1: not UTF-8 at byte"),
    ("train-bad-toml", "train --config {bad_toml} --set out_dir={out}", "bad.toml: not valid TOML"),
    # sft prepare
    ("sft-gbk", "sft prepare --data {gbk_jsonl} --tokenizer {bpe} --out {out}", GBK_JSONL),
    ("sft-gbk-csv", "sft prepare --data {gbk_csv} --tokenizer {bpe} --out {out} --columns q,a",
     "gbk.csv:2: not UTF-8 at byte"),
    ("sft-wrong-encoding", "sft prepare --data {gbk_jsonl} --tokenizer {bpe} --out {out} --encoding big5",
     "gbk.jsonl: not valid big5"),
    ("sft-missing", "sft prepare --data {root}/nope.jsonl --tokenizer {bpe} --out {out}", "nope.jsonl: no such"),
    ("sft-val-negative", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --val-fraction -1", "--val-fraction"),
    ("sft-val-one", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --val-fraction 1", "--val-fraction"),
    ("sft-squad-bad", "sft prepare --data {squad_bad} --tokenizer {bpe} --out {out}", r"squad.json: data\[0\]"),
    ("sft-bad-line", "sft prepare --data {bad_jsonl} --tokenizer {bpe} --out {out}", "bad.jsonl:2"),
    ("sft-max-len-0", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --max-len 0", "--max-len"),
    ("sft-bad-columns", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --columns question", "--columns"),
    ("sft-unknown-encoding", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --encoding nope", "--encoding"),
    # sft generate (no network: each fails before the first request)
    ("gen-q-per-title-0", "sft generate questions --titles 天龙八部 --per-title 0 --out {out_jsonl}", "--per-title"),
    ("gen-q-concurrency-0", "sft generate questions --titles 天龙八部 --concurrency 0 --out {out_jsonl}",
     "--concurrency"),
    ("gen-q-titles-missing", "sft generate questions --titles-file {root}/nope.txt --out {out_jsonl}", "nope.txt"),
    ("gen-q-titles-gbk", "sft generate questions --titles-file {gbk_txt} --out {out_jsonl}", "gbk.txt:1: not UTF-8"),
    ("gen-q-no-key", "sft generate questions --titles 天龙八部 --api-key-env MINIGLM_NO_SUCH_KEY --out {out_jsonl}",
     "MINIGLM_NO_SUCH_KEY"),
    ("gen-a-missing", "sft generate answers --questions {root}/nope.jsonl --out {out_jsonl}", "nope.jsonl"),
    ("gen-a-gbk", "sft generate answers --questions {gbk_jsonl} --out {out_jsonl}", "gbk.jsonl:1: not UTF-8"),
    ("gen-a-no-question", "sft generate answers --questions {corpus}/train.jsonl --out {out_jsonl}",
     "train.jsonl:1: no non-empty string field 'question'"),
    ("gen-p-missing", "sft generate passages --corpus {root}/nope.jsonl --out {out_jsonl}", "nope.jsonl"),
    ("gen-p-chunk-0", "sft generate passages --corpus {corpus}/train.jsonl --chunk-chars 0 --out {out_jsonl}",
     "--chunk-chars"),
    ("gen-p-gbk-txt", "sft generate passages --corpus {gbk_txt} --out {out_jsonl}", "gbk.txt:1: not UTF-8"),
    ("gen-p-no-text", "sft generate passages --corpus {sft} --out {out_jsonl}", "sft.jsonl:1: no string field"),
    # finetune: refused before RUN/data is written
    ("ft-hf-false", "finetune --model {root}/nope --data {sft} --out {out} --set hf=false", "hf=false"),
    ("ft-batch-0", "finetune --model {root}/nope --data {sft} --out {out} --set batch_size=0", "batch_size"),
    ("ft-missing-data", "finetune --model {root}/nope --data {root}/nope.jsonl --out {out}", "nope.jsonl"),
    ("ft-val-one", "finetune --model {root}/nope --data {sft} --out {out} --val-fraction 1", "--val-fraction"),
    ("ft-lora-0", "finetune --model {root}/nope --data {sft} --out {out} --lora-r 0", "--lora-r"),
    ("ft-full-and-lora", "finetune --model {root}/nope --data {sft} --out {out} --full --lora-r 4", "--full"),
    ("ft-missing-model", "finetune --model {root}/nope --data {sft} --out {out}", "nope"),
    # merge, plot, import-ckpt
    ("merge-missing", "merge {root}/nope --out {out}", "nope"),
    ("merge-no-out", "merge {run}", "--out"),
    ("plot-missing", "plot {root}/nope --out {out}/loss.png", "nope"),
    ("plot-no-metrics", "plot {run} --out {out}/loss.png", "metrics.jsonl"),
    ("import-missing", "import-ckpt {root}/nope.pt --out {out}", "nope.pt: no such"),
    ("import-vocab-negative", "import-ckpt {bad_ckpt} --out {out}", "bad.pt: bad model_args .*vocab_size"),
    ("import-not-ckpt", "import-ckpt {gbk_txt} --out {out}", "gbk.txt: not a PyTorch checkpoint"),
    # generate
    ("gen-file-gbk", "generate --run {run} --file {gbk_txt}", "gbk.txt:1: not UTF-8 at byte 0 .*--encoding gbk"),
    ("gen-file-utf16", "generate --run {run} --file {utf16_txt}", r"utf16.txt:\d+: .*--encoding utf-16-le"),
    ("gen-file-missing", "generate --run {run} --file {root}/nope.txt", "nope.txt: no such file"),
    ("gen-file-empty", "generate --run {run} --file {empty_txt}", "empty.txt: no prompts"),
    ("gen-temperature", "generate --run {run} --prompt hi --temperature -1", "--temperature"),
    ("gen-top-p", "generate --run {run} --prompt hi --top-p 2", "--top-p"),
    ("gen-temperature-tiny", "generate --run {run} --prompt hi --temperature 1e-320", "--temperature"),
    ("gen-repetition-tiny", "generate --run {run} --prompt hi --repetition-penalty 1e-300", "--repetition-penalty"),
    ("gen-batch-0", "generate --run {run} --prompt hi --batch-size 0", "--batch-size"),
    ("gen-run-missing", "generate --run {root}/nope --prompt hi", "nope"),
    # chat (stdin: GBK bytes typed into a UTF-8 session)
    ("chat-gbk-stdin", "chat --run {run}", r"stdin:1: not UTF-8 at byte 0 .*--encoding gbk"),
    ("chat-top-k", "chat --run {run} --top-k -1", "--top-k"),
    ("chat-run-missing", "chat --run {root}/nope", "nope"),
    # serve: refused before it binds
    ("serve-port", "serve --run {run} --port 70000", "--port 70000"),
    ("serve-max-batch", "serve --run {run} --max-batch 0", "--max-batch"),
    # eval
    ("eval-gbk", "eval --run {run} --data {gbk_jsonl} --out {out} --embedder none", GBK_JSONL),
    ("eval-missing-data", "eval --run {run} --data {root}/nope.jsonl --out {out}", "nope.jsonl: no such"),
    ("eval-no-data", "eval --run {run} --out {out}", "--data"),
    ("eval-embedder", "eval --run {run} --data {sft} --out {out} --embedder {root}/no-embedder", "no-embedder"),
    ("eval-limit", "eval --run {run} --data {sft} --out {out} --limit -1", "--limit"),
    ("eval-squad-bad", "eval --run {run} --data {squad_bad} --out {out} --embedder none", r"squad.json: data\[0\]"),
    ("ppl-gbk", "eval ppl --run {run} --text {gbk_txt} --out {out}", "gbk.txt:1: not UTF-8 at byte 0 .*--encoding gbk"),
    ("ppl-gbk-jsonl", "eval ppl --run {run} --text {gbk_jsonl} --out {out}", "gbk.jsonl:1: not UTF-8"),
    ("ppl-missing", "eval ppl --run {run} --text {root}/nope.txt --out {out}", "nope.txt: no such file"),
    ("ppl-stride", "eval ppl --run {run} --text {sft} --out {out} --stride -1", "--stride"),
    ("classify-gbk", "eval classify --run {run} --data {gbk_jsonl} --out {out}", GBK_JSONL),
    ("classify-batch-0", "eval classify --run {run} --data {sft} --out {out} --batch-size 0", "--batch-size"),
    ("classify-labels", "eval classify --run {run} --data {sft} --out {out} --labels 是,否", "--labels"),
    # report, export
    ("report-no-eval", "report {run}", "eval"),
    ("report-three", "report {run} {run} {run}", "one run, or two"),
    ("export-missing", "export --run {root}/nope --out {out}", "nope"),
    ("export-outtype", "export --run {run} --to gguf --outtype q4 --out {out}/m.gguf", "--outtype"),
    # damaged shards (issue 22 M): the file and what to do
    ("train-empty-val-bin", "train --set data={empty_val_data} --set out_dir={out} " + TINY,
     r"empty_val_data/val.bin: the shard is empty .*corpus tokenize"),
    ("train-odd-train-bin", "train --set data={odd_train_data} --set out_dir={out} " + TINY,
     r"odd_train_data/train.bin: \d+ bytes, not a whole number of uint16 tokens"),
    # values that used to be tracebacks (issue 22 T)
    ("train-odd-head-dim", "train --set data={data} --set out_dir={out} " + TINY + " --set model.n_embd=34",
     "model.n_embd must be an even multiple of n_head .*34/2"),
    ("world-out-root", "world --out / --overwrite", "/: is the file system root"),
    # outputs that are inputs (issue 22 A): refused before any work, whatever --overwrite says
    ("export-onto-its-run", "export --run {run} --to hf --out {run} --overwrite", "holds an input of this command"),
    ("export-into-its-ckpt", "export --run {run} --out {run}/ckpt", "is also an input of this command"),
    ("gguf-onto-its-weights", "export --run {run} --to gguf --out {run}/ckpt/model.safetensors --overwrite",
     "is inside an input"),
    ("merge-onto-its-run", "merge {run} --out {run}", "holds an input of this command"),
    ("sft-test-out-is-data", "sft prepare --data {sft} --tokenizer {bpe} --out {out} --test-out {sft} --test-count 1",
     "sft.jsonl: is also an input"),
    ("sft-out-is-tokenizer", "sft prepare --data {sft} --tokenizer {bpe} --out {bpe} --overwrite", "is also an input"),
    ("prepare-out-holds-input", "corpus prepare {gbk_txt} --encoding gbk --out {root} --overwrite",
     "holds an input of this command"),
    ("prepare-out-is-symlinked-input", "corpus prepare {sft_link_jsonl} --out {sft}", "is also an input"),
    ("tokenize-out-in-corpus", "corpus tokenize --corpus {corpus} --tokenizer {bpe} --out {corpus}/data",
     "is inside an input of this command"),
    ("tok-train-out-is-corpus", "tokenizer train --corpus {corpus} --out {corpus}", "is also an input"),
    ("train-out-is-data", "train --set data={data} --set out_dir={data}", "is also an input"),
    ("train-out-in-init-run", "train --set data={data} --set init_from={run} --set out_dir={run}/ckpt/x",
     "is inside an input"),
    ("eval-out-is-run", "eval --run {run} --data {sft} --out {run} --embedder none", "holds an input"),
    ("ppl-out-is-text", "eval ppl --run {run} --text {sft} --out {sft}", "is also an input"),
    ("classify-out-in-ckpt", "eval classify --run {run} --data {sft} --out {run}/ckpt/eval", "is inside an input"),
    ("import-out-is-ckpt", "import-ckpt {bad_ckpt} --out {bad_ckpt}", "is also an input"),
    ("ft-out-is-data", "finetune --model {root}/nope --data {sft} --out {sft}", "is also an input"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, world_dir, bpe_dir) -> dict[str, Path]:
    """Small input files, good and bad, in one folder (hashed before and after every case)."""
    import torch

    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.shards import tokenize_corpus
    from miniglm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    make_chat_run(root, bpe_dir, block_size=64, n_layer=1)
    prepare_corpus([str(world_dir / "corpus.jsonl")], root / "corpus", PrepareOptions(split="file", val_fraction=0.1))
    tokenize_corpus(root / "corpus", load_tokenizer(bpe_dir), root / "data")
    shutil.copy(world_dir / "sft_test.jsonl", root / "sft.jsonl")
    (root / "gbk.txt").write_bytes("话说天下大势，分久必合，合久必分。\n".encode("gbk"))
    (root / "gbk.jsonl").write_bytes(GBK_QA.encode("gbk"))
    (root / "gbk.csv").write_bytes("q,a\n问题,答案\n".encode("gbk"))
    (root / "gbk.toml").write_bytes('out_dir = "运行"\n'.encode("gbk"))
    (root / "utf16.txt").write_bytes("你好，世界。\n".encode("utf-16-le"))
    (root / "empty.txt").write_text("")
    (root / "bad.jsonl").write_text('{"text": "好", "question": "q", "answer": "a"}\n{"text": 好}\n')
    (root / "bad.toml").write_text("max_steps = = 3\n")
    (root / "squad.json").write_text(json.dumps({"version": "1", "data": ["oops"]}))
    gbk_doc = '{"text": "天下大势"}\n'.encode("gbk")
    bad_val = b'{"text": "ok"}\n{oops\n'
    for name, train, val in [("gbk_corpus", gbk_doc, gbk_doc), ("bad_val_corpus", b'{"text": "ok"}\n', bad_val)]:
        (root / name).mkdir()
        (root / name / "train.jsonl").write_bytes(train)
        (root / name / "val.jsonl").write_bytes(val)
    args = {"vocab_size": -5, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8}
    torch.save({"model_args": args, "model": {}}, root / "bad.pt")
    for name, shard, size in [("empty_val_data", "val.bin", 0), ("odd_train_data", "train.bin", 1001)]:
        shutil.copytree(root / "data", root / name)
        (root / name / shard).write_bytes(b"\1" * size)
    (root / "sft_link.jsonl").symlink_to(root / "sft.jsonl")
    paths = {"root": root, "run": root / "run", "corpus": root / "corpus", "data": root / "data",
             "sft": root / "sft.jsonl", "bpe": bpe_dir, "squad_bad": root / "squad.json", "bad_ckpt": root / "bad.pt"}
    for f in root.iterdir():
        paths.setdefault(f.name.replace(".", "_"), f)
    return paths


def tree_hash(*roots: Path) -> dict[str, str]:
    """Every file under the roots and its content hash: a changed, added or removed file shows."""
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for root in roots for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(case, inputs, tmp_path, capsys, monkeypatch, one_thread):
    name, argv, expected = case
    out = tmp_path / "out"
    paths = {k: str(v) for k, v in {**inputs, "out": out, "out_jsonl": tmp_path / "out.jsonl"}.items()}
    monkeypatch.delenv("MINIGLM_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")  # the API key is there: the bad input is what fails
    if name == "chat-gbk-stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode("gbk")), encoding="utf-8"))
    before = tree_hash(inputs["root"], inputs["bpe"])
    try:
        rc = main([a.format(**paths) for a in argv.split()])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("miniglm: error: "), err
    assert re.search(expected, last), last
    assert tree_hash(inputs["root"], inputs["bpe"]) == before, "an input changed"
    assert not out.exists() and not (tmp_path / "out.jsonl").exists(), "output left behind"


def test_every_leaf_command_has_cases():
    from miniglm.cli import build_parser

    def leaves(parser, prefix=()):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            yield " ".join(prefix)
            return
        for name, p in subs[0].choices.items():
            yield from leaves(p, (*prefix, name))

    covered = {" ".join(w for w in argv.split() if not w.startswith(("-", "{")))[:40] for _, argv, _ in CASES}
    for leaf in leaves(build_parser()):
        assert any(c.startswith(leaf) for c in covered), leaf


def test_encoding_reads_what_the_error_names(inputs, tmp_path, capsys, monkeypatch, one_thread):
    """The fix each message names works: --encoding gbk / utf-16-le (UTF-16 without a BOM: no NUL-byte refusal)."""
    run, out = inputs["run"], tmp_path / "out"
    novel = tmp_path / "novel.txt"  # UTF-16 without a BOM: NUL bytes, and no longer refused as binary
    novel.write_bytes("第一回 出山\n话说天下大势。\n第二回 下山\n分久必合，合久必分。\n".encode("utf-16-le"))
    assert main(["corpus", "prepare", str(novel), "--out", str(out / "c"), "--val-fraction", "0.5",
                 "--encoding", "utf-16-le"]) == 0
    assert "话说天下大势" in (out / "c" / "train.jsonl").read_text() + (out / "c" / "val.jsonl").read_text()
    assert main(["sft", "prepare", "--data", str(inputs["gbk_jsonl"]), "--tokenizer", str(inputs["bpe"]),
                 "--out", str(out / "s"), "--val-fraction", "0", "--encoding", "gbk"]) == 0
    assert main(["generate", "--run", str(run), "--file", str(inputs["gbk_txt"]), "--encoding", "gbk",
                 "--max-new-tokens", "2", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "话说天下大势，分久必合，合久必分。"
    assert main(["generate", "--run", str(run), "--file", str(inputs["utf16_txt"]), "--encoding", "utf-16-le",
                 "--max-new-tokens", "2", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "你好，世界。"
    assert main(["eval", "ppl", "--run", str(run), "--text", str(inputs["gbk_txt"]), "--encoding", "gbk",
                 "--out", str(out / "p")]) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n/exit\n".encode("gbk")), encoding="utf-8"))
    assert main(["chat", "--run", str(run), "--encoding", "gbk", "--max-new-tokens", "2"]) == 0
    assert "模型: " in capsys.readouterr().out
