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
from miniglm.devices import resolve_device
from miniglm.fileio import UserError, atomic_dir, mark_dir, remove_output

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DemoOptions:
    out: str = "runs/demo"
    characters: int = 500
    bios: int = 24  # many phrasings of each fact: stored as knowledge, not memorised as text
    vocab_size: int = 4096
    seed: int = 1337
    questions: int = 2250  # asked of the fine-tuned model at the end, per split (all 2,250 held-out ones)
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for both training stages
    pretrain_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    mix_qa: bool = True  # also pretrain on the training characters' Q&A (held-out characters' never)
    han_chars: bool = True  # a token never spans two Chinese characters: names are stable tokens
    probe_questions: int = 500  # per split, asked of the pretraining model at each evaluation (0: off)
    long: bool = False  # LONG_FACTOR times the pretraining steps: where the knowledge probes saturate


LONG_FACTOR = 6  # `miniglm demo --long`: 18,000 steps, ~45 minutes on 2 cores (pretraining 421 s by default)


def pretrain_extra(opts: DemoOptions, vocab_size: int) -> list[str]:
    """The pretraining stage's overrides of configs/demo.toml: the vocabulary, --long, then the user's."""
    extra = [f"model.vocab_size={vocab_size}"]
    if opts.long:
        extra.append(f"max_steps={LONG_FACTOR * load_config(CONFIGS / 'demo.toml').max_steps}")
    return [*extra, *opts.overrides, *opts.pretrain_overrides]


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
    for cfg in (stage_config("demo.toml", run / "pretrain", run / "data", pretrain_extra(opts, opts.vocab_size)),
                stage_config("demo-sft.toml", run / "sft", run / "sft_data",
                             [f"init_from={run / 'pretrain'}", *opts.overrides, *opts.sft_overrides])):
        resolve_device(cfg.device)  # a GPU asked for and not there: one line before the world is written


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
                    [{"text": qa_prompt(r["question"]) + r["answer"]}
                     for _, r in read_jsonl(run / "world" / "sft_train.jsonl")])
        sources.append(str(run / "world" / "qa_corpus.jsonl"))
    cs = corpus.prepare_corpus(sources, run / "corpus",
                               corpus.PrepareOptions(split="file", val_fraction=0.05, seed=opts.seed))
    log(f"   {cs.train_documents} train / {cs.val_documents} val documents")

    log(f"== 3/6 tokenizer train (byte-level BPE, vocab {opts.vocab_size}"
        f"{', one Chinese character a token at most' if opts.han_chars else ''}) -> {run / 'tokenizer'}")
    tok = tokenizer.train_bpe(corpus.load_documents(run / "corpus" / "train.jsonl"), opts.vocab_size,
                              run / "tokenizer", han_chars=opts.han_chars)
    rep = tokenizer.report(tok, corpus.load_documents(run / "corpus" / "val.jsonl"))
    log(f"   {rep['chars_per_token']} characters/token on val, round trip failures: {rep['roundtrip_failures']}")

    log(f"== 4/6 corpus tokenize -> {run / 'data'}")
    meta = shards.tokenize_corpus(run / "corpus", tok, run / "data")
    log(f"   {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']})")

    for stage in ("pretrain", "sft_data", "sft"):  # the data above was made anew: so are the models
        remove_output(run / stage)
    log(f"== 5/6 pretrain -> {run / 'pretrain'}")
    pre_cfg = stage_config("demo.toml", run / "pretrain", run / "data", pretrain_extra(opts, tok.vocab_size))
    probe = KnowledgeProbe(run / "world", tok, opts.probe_questions) if opts.probe_questions else None
    pre = train(pre_cfg, log=log, probe=probe)
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
    scores = evaluate_demo(run, log, opts.questions, device=sft_cfg.device)  # where it trained
    seconds = time.perf_counter() - t0
    summary = {"world": ws.__dict__, "corpus": cs.__dict__, "tokenizer": rep, "shards": meta, "pretrain": pre,
               "sft": sft, "eval": scores, "seconds": seconds}
    md, _ = write_demo_report(run, summary)
    log(f"   the demo's report (knowledge probes during pretraining, exact match per fact): {md.with_suffix('.html')}")
    log(f"demo done in {seconds:.1f}s: {run}")
    return summary


def write_demo_report(run: Path, summary: dict):
    """RUN/report.md + report.html: the pretraining's loss and knowledge-probe curves, and the fine-tuned
    model's exact match per fact on held-out and training characters."""
    from miniglm.report import Doc, _plt, fmt, load_eval
    from miniglm.runs import read_metrics

    doc = Doc("miniglm demo", run)
    w, pre = summary["world"], summary["pretrain"]
    doc.para(f"{w['characters']} characters ({w['test_characters']} held out), {w['biographies']:,} biographies; "
             f"tokenizer {summary['tokenizer']['vocab_size']} tokens, {summary['tokenizer']['chars_per_token']} "
             f"characters/token; pretraining {pre['steps']} steps, {pre['params'] / 1e6:.2f}M parameters, "
             f"{pre['tok_per_s']:,.0f} tok/s; the whole demo {summary['seconds']:.0f} s")
    held, train = load_eval(run / "sft" / "eval")[0], load_eval(run / "sft" / "eval-train")[0]
    doc.heading("Exact match of the fine-tuned model (greedy)")
    facts = sorted(set(held.get("groups", {})) | set(train.get("groups", {})))

    def cell(scores: dict, fact: str) -> str:
        return fmt("exact_match", scores["groups"][fact]["exact_match"]) if fact in scores.get("groups", {}) else "-"

    doc.table(["fact", f"held-out characters (n={held['n']})", f"training characters (n={train['n']})"],
              [["all", fmt("exact_match", held["all"]["exact_match"]), fmt("exact_match", train["all"]["exact_match"])],
               *([f, cell(held, f), cell(train, f)] for f in facts)])
    rows = read_metrics(run / "pretrain")
    plt = _plt()
    fig, (loss_ax, em_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    for key, style, label in (("loss", "-", "train loss"), ("val_loss", "o-", "val loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            loss_ax.plot(*zip(*points, strict=True), style, lw=1, label=label)
    loss_ax.set(xlabel="pretraining step", ylabel="loss (nats/token)", title="pretraining loss")
    for key, label in (("probe_heldout_em", "held-out characters"), ("probe_train_em", "training characters")):
        points = [(r["step"], 100 * r[key]) for r in rows if key in r]
        if points:
            em_ax.plot(*zip(*points, strict=True), "o-", lw=1.5, label=label)
    em_ax.set(xlabel="pretraining step", ylabel="exact match %", ylim=(0, 100),
              title="the pretraining model asked in the Q&A format (no SFT)")
    for ax in (loss_ax, em_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    doc.heading("What pretraining stores: loss and knowledge probes")
    doc.figure("pretraining.png", fig)
    return doc.save("report")


def qa_prompt(question: str) -> str:
    """The Q&A format of the mixed pretraining data, which the probe asks pretraining checkpoints in."""
    return f"问：{question}\n答："


class KnowledgeProbe:
    """Exact match of a pretraining model's greedy answers, asked in the mixed data's Q&A format (no SFT),
    on up to n questions about held-out characters and n about training characters. Called at each
    evaluation of the pretraining (train(probe=...)): the curve of what pretraining has stored so far."""

    def __init__(self, world_dir: Path, tok, n: int):
        from miniglm.fileio import read_jsonl

        self.tok = tok
        self.splits = {}
        for split, key in (("sft_test", "probe_heldout_em"), ("sft_train", "probe_train_em")):
            rows = [r for _, r in read_jsonl(world_dir / f"{split}.jsonl")][:n]
            self.splits[key] = ([tok.encode(qa_prompt(r["question"])) for r in rows], [r["answer"] for r in rows])

    def __call__(self, model) -> dict:
        from miniglm.engine import Engine, SamplingParams
        from miniglm.metrics import exact_match

        engine = Engine(model, self.tok)  # a decoding copy on the model's device; the model is left as it is
        params = SamplingParams(max_new_tokens=16, fit_new_tokens=True, trim_prompt=True, stop_ids=[self.tok.eot_id])
        result = {}
        for key, (prompts, answers) in self.splits.items():
            outs = [c.text.strip() for i in range(0, len(prompts), 256)
                    for c in engine.generate(prompts[i:i + 256], params)]
            result[key] = sum(map(exact_match, outs, answers)) / max(len(answers), 1)
        return result


def evaluate_demo(run: Path, log=print, n: int = 500, device: str = "auto") -> dict:
    """Ask the fine-tuned model up to n questions about training characters and about held-out ones
    (greedy), score them beside the most-frequent-answer-per-fact baseline, write RUN/sft/eval (held
    out) and RUN/sft/eval-train with their reports, and print a few answers."""
    from miniglm.chat import load_run
    from miniglm.engine import SamplingParams
    from miniglm.evaluate import answer, load_examples, majority_baseline, score, summarize, write_results
    from miniglm.metrics import mean_scores
    from miniglm.report import write_report

    model = load_run(run / "sft", device=device)
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
