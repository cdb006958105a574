"""`miniglm demo`: the whole pipeline on the embedded synthetic wuxia world, in minutes on a CPU.

world -> corpus -> tokenizer -> shards -> pretrain -> SFT data -> SFT. The training settings are
configs/demo.toml and configs/demo-sft.toml; `overrides` (KEY=VALUE) apply to both stages,
`pretrain_overrides` and `sft_overrides` to one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from miniglm import corpus, shards, tokenizer, world
from miniglm.config import load_config
from miniglm.fileio import UserError, atomic_dir, mark_dir, remove_output

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DemoOptions:
    out: str = "runs/demo"
    characters: int = 500
    bios: int = 24  # many phrasings of each fact: stored as knowledge, not memorised as text
    vocab_size: int = 4096
    seed: int = 1337
    questions: int = 500  # asked of the fine-tuned model at the end, per split
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for both training stages
    pretrain_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    mix_qa: bool = True  # also pretrain on the training characters' Q&A (held-out characters' never)


def stage_config(name: str, run: Path, data: Path, extra: list[str]):
    path = CONFIGS / name
    if not path.exists():
        raise UserError(f"{path}: missing; install miniglm from its source tree (pip install -e .)")
    return load_config(path, [f"out_dir={run}", f"data={data}", *extra])


def check_options(opts: DemoOptions, run: Path) -> None:
    """Every number and --set of both stages, checked before the first stage writes anything."""
    if opts.characters < world.MIN_CHARACTERS:
        raise UserError(f"--characters must be at least {world.MIN_CHARACTERS}, got {opts.characters}")
    for name in ("bios", "questions"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.vocab_size < tokenizer.MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be at least {tokenizer.MIN_VOCAB_SIZE}, got {opts.vocab_size}")
    stage_config("demo.toml", run / "pretrain", run / "data",
                 [f"model.vocab_size={opts.vocab_size}", *opts.overrides, *opts.pretrain_overrides])
    stage_config("demo-sft.toml", run / "sft", run / "sft_data",
                 [f"init_from={run / 'pretrain'}", *opts.overrides, *opts.sft_overrides])


def run_demo(opts: DemoOptions, log=print) -> dict:
    from miniglm.sft.data import prepare_sft
    from miniglm.train import train

    t0 = time.perf_counter()
    check_options(opts, Path(opts.out))  # every number and --set, before anything is written
    run = mark_dir(opts.out)  # the demo's stages write their marked folders inside it
    log(f"== 1/6 world: {opts.characters} characters, {opts.bios} biographies each -> {run / 'world'}")
    ws = world.build_world(run / "world", opts.characters, opts.bios, seed=opts.seed)
    log(f"   {ws.biographies} biographies ({ws.corpus_characters:,} characters), "
        f"{ws.sft_train} train Q&A, {ws.sft_test} held-out Q&A ({ws.test_characters} characters)")

    log(f"== 2/6 corpus prepare -> {run / 'corpus'}")
    sources = [str(run / "world" / "corpus.jsonl")]
    if opts.mix_qa:  # "mixed training": seeing Q&A beside biographies teaches how facts are asked for
        from miniglm.fileio import read_jsonl, write_jsonl

        write_jsonl(run / "world" / "qa_corpus.jsonl",
                    [{"text": f"问：{r['question']}\n答：{r['answer']}"}
                     for _, r in read_jsonl(run / "world" / "sft_train.jsonl")])
        sources.append(str(run / "world" / "qa_corpus.jsonl"))
    cs = corpus.prepare_corpus(sources, run / "corpus",
                               corpus.PrepareOptions(split="file", val_fraction=0.05, seed=opts.seed))
    log(f"   {cs.train_documents} train / {cs.val_documents} val documents")

    log(f"== 3/6 tokenizer train (byte-level BPE, vocab {opts.vocab_size}) -> {run / 'tokenizer'}")
    tok = tokenizer.train_bpe(corpus.load_documents(run / "corpus" / "train.jsonl"), opts.vocab_size,
                              run / "tokenizer")
    rep = tokenizer.report(tok, corpus.load_documents(run / "corpus" / "val.jsonl"))
    log(f"   {rep['chars_per_token']} characters/token on val, round trip failures: {rep['roundtrip_failures']}")

    log(f"== 4/6 corpus tokenize -> {run / 'data'}")
    meta = shards.tokenize_corpus(run / "corpus", tok, run / "data")
    log(f"   {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']})")

    for stage in ("pretrain", "sft_data", "sft"):  # the data above was made anew: so are the models
        remove_output(run / stage)
    log(f"== 5/6 pretrain -> {run / 'pretrain'}")
    pre_cfg = stage_config("demo.toml", run / "pretrain", run / "data",
                           [f"model.vocab_size={tok.vocab_size}", *opts.overrides, *opts.pretrain_overrides])
    pre = train(pre_cfg, log=log)
    log(f"   {pre['steps']} steps in {pre['seconds']:.0f}s ({pre['tok_per_s']:,.0f} tok/s), "
        f"val loss {pre['val_loss']:.3f}, val bits/byte {pre['val_bpb']:.3f}")

    log(f"== 6/6 SFT on the Q&A of {ws.train_characters} characters -> {run / 'sft'}")
    sft_meta = prepare_sft(run / "world" / "sft_train.jsonl", tok, run / "sft_data",
                           max_len=pre_cfg.model.block_size + 1, seed=opts.seed)
    sft_cfg = stage_config("demo-sft.toml", run / "sft", run / "sft_data",
                           [f"init_from={run / 'pretrain'}", *opts.overrides, *opts.sft_overrides])
    sft = train(sft_cfg, log=log)
    log(f"   {sft_meta['train_records']} records, {sft['steps']} steps in {sft['seconds']:.0f}s, "
        f"val loss {sft['val_loss']:.3f}")
    log("== evaluation: the questions asked of the fine-tuned model")
    scores = evaluate_demo(run, log, opts.questions)
    seconds = time.perf_counter() - t0
    log(f"demo done in {seconds:.1f}s: {run}")
    return {"world": ws.__dict__, "corpus": cs.__dict__, "tokenizer": rep, "shards": meta, "pretrain": pre,
            "sft": sft, "eval": scores, "seconds": seconds}


def evaluate_demo(run: Path, log=print, n: int = 500) -> dict:
    """Ask the fine-tuned model up to n questions about training characters and about held-out ones
    (greedy), score them beside the most-frequent-answer-per-fact baseline, write RUN/sft/eval (held
    out) and RUN/sft/eval-train with their reports, and print a few answers."""
    from miniglm.chat import load_run
    from miniglm.engine import SamplingParams
    from miniglm.evaluate import answer, load_examples, majority_baseline, score, summarize, write_results
    from miniglm.metrics import mean_scores
    from miniglm.report import write_report

    model = load_run(run / "sft", device="cpu")
    train_examples = load_examples(run / "world" / "sft_train.jsonl")
    results = {}
    for split, label, out in [("sft_train", "training characters", "eval-train"),
                              ("sft_test", "held-out characters", "eval")]:
        examples = load_examples(run / "world" / f"{split}.jsonl", n)
        predictions = answer(model, examples, SamplingParams(max_new_tokens=16), batch_size=64)
        scores = score(predictions, examples)
        summary = {"kind": "generation", "run": str(run / "sft"), "data": str(run / "world" / f"{split}.jsonl"),
                   "template": model.template, **summarize(scores, examples)}
        baseline = mean_scores(score(majority_baseline(train_examples, examples, "fact"), examples))
        summary["baselines"] = {"most frequent answer per fact": baseline}
        with atomic_dir(run / "sft" / out, keep=True) as tmp:
            write_results(tmp, examples, predictions, scores, summary)
            write_report(tmp)
        a = summary["all"]
        log(f"   {label} ({len(examples)} questions): exact match {a['exact_match']:.1%}, ROUGE-L "
            f"{a['rouge-l']:.1f}  |  baseline (most frequent answer per fact): exact match "
            f"{baseline['exact_match']:.1%}, ROUGE-L {baseline['rouge-l']:.1f}")
        for ex, pred in list(zip(examples, predictions, strict=True))[:3]:
            log(f"     问：{ex.prompt}  参考：{ex.references[0]}  模型：{pred}")
        results[split] = {"exact_match": a["exact_match"], "rouge-l": a["rouge-l"], "baseline": baseline}
    log(f"   reports: {run / 'sft' / 'eval' / 'report.html'}, {run / 'sft' / 'eval-train' / 'report.html'}")
    return results
