"""The `miniglm` command: one thin subcommand per stage. The work lives in the modules.

Imports of the heavy modules happen inside each command, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from miniglm.corpus import CHAPTER_PATTERN
from miniglm.devices import check_device_name
from miniglm.fileio import UserError, allow_overwrite, begin_command, check_output, end_command
from miniglm.sft.client import DEFAULT_BASE_URL, DEFAULT_MODEL, ClientOptions
from miniglm.sft.formats import format_names
from miniglm.sft.prompts import ASPECTS, SYSTEM_PROMPT

DEFAULT_NEW_TOKENS = 128


# --- option checks: argparse reports a bad value as "miniglm: error: argument --FLAG: ..." ------------
class Parser(argparse.ArgumentParser):
    """Every error, argparse's own too, ends with one line starting "miniglm: error:". No abbreviated
    options (every subcommand's parser is one of these): `demo --lon` is a typo, not `--long`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"miniglm: error: {message} (see {self.prog} --help)\n")


def at_least(low: int):
    """argparse type: an integer >= low."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return check


def fraction(text: str) -> float:
    """argparse type: a share in [0, 1), e.g. of records held out for validation."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# --- options that several commands share ------------------------------------------------------------
def _add_encoding(p: argparse.ArgumentParser, what: str = "the input file") -> None:
    p.add_argument("--encoding", default=None,
                   help=f"the encoding of {what} when not UTF-8, e.g. gbk, gb18030, big5, utf-16-le")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that miniglm did not write (its files are lost); "
                        "outputs miniglm wrote are replaced without it")


def _add_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--columns", default=None, metavar="PROMPT,ANSWER[,HISTORY]",
                   help="the prompt and answer fields of every record, and a history field of [question, answer] "
                        "pairs (JSON only), e.g. content,summary; a .csv's RAFT task.json names them itself; the "
                        "plain template names its parts after them")
    p.add_argument("--value", action="append", default=[], metavar="CELL=TEXT",
                   help="rename a whole prompt or answer value, e.g. --value 1=正面 --value 0=负面 (repeatable)")


def _add_sampling(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    p.add_argument("--run", required=run_required, help="run or checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"at most this many tokens per answer (default {DEFAULT_NEW_TOKENS}, fewer where the "
                        "context leaves less room)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--trim-prompt", action="store_true", help="keep the end of a prompt past the context")
    p.add_argument("--raw", action="store_true", help="ignore the run's chat template: continue raw text")
    p.add_argument("--keep-special", action="store_true",
                   help="keep special tokens such as <|end|> in the output text (left out by default)")
    _add_device(p)
    p.add_argument("--int8", action="store_true",
                   help="int8 weights on CPU: faster decoding, slightly different logits")


def _device(text: str) -> str:
    try:
        return check_device_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")


def _add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (llama-style runs; needs a C++ compiler): ~20-30 s of "
                        "compiling per batch size and length bucket, then up to ~2x faster steps on CPU (more with "
                        "--int8)")


def _local(ref: str | None) -> str | None:
    """A tokenizer or model given by path (an input to protect), not by name (cl100k_base, a hub name)."""
    from pathlib import Path

    return ref if ref and Path(ref).exists() else None


# --- the commands: each cmd_ function beside the add_..._parser that declares its flags (COMMANDS lists them)
def cmd_corpus_prepare(args: argparse.Namespace) -> int:
    from miniglm import corpus

    check_output(args.out, corpus.input_paths(args.inputs), args.overwrite)
    opts = corpus.PrepareOptions(
        text_field=args.text_field, split=args.split, chapter_regex=args.chapter_regex,
        val_fraction=args.val_fraction, seed=args.seed, nfkc=args.nfkc, drop=args.drop,
        errors=args.errors, encoding=args.encoding)
    stats = corpus.prepare_corpus(args.inputs, args.out, opts)
    for line in corpus.format_skipped(stats):
        print(line, file=sys.stderr)
    print(corpus.format_stats(stats))
    print(f"wrote {args.out}/train.jsonl, val.jsonl, stats.json")
    return 0


def add_corpus_prepare_parser(csub) -> None:
    prep = csub.add_parser("prepare", help="raw novels (txt in any Chinese encoding, HTML, jsonl) -> documents",
                           description="Read, clean and split raw text into train/val documents (by document).")
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    prep.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, stats.json)")
    prep.add_argument("--text-field", default="text", help="field holding the text in .json/.jsonl (default: text)")
    prep.add_argument("--split", choices=["chapter", "file"], default="chapter",
                      help="one document per chapter title (第…回/章/卷) or per file/record (default: chapter)")
    prep.add_argument("--chapter-regex", default=CHAPTER_PATTERN, help="regex of a chapter-title line")
    prep.add_argument("--val-fraction", type=fraction, default=0.05, help="share of documents for val (default 0.05)")
    prep.add_argument("--seed", type=int, default=1337)
    prep.add_argument("--nfkc", action="store_true", help="apply Unicode NFKC (turns full-width ，into ,)")
    prep.add_argument("--drop", default=None, metavar="REGEX", help=r"remove matches, e.g. 'B\d{3}' placeholders")
    prep.add_argument("--errors", choices=["strict", "replace"], default="strict",
                      help="undecodable bytes: stop with an error (default) or replace with U+FFFD")
    prep.add_argument("--encoding", default=None, help="skip detection and use this encoding")
    _add_overwrite(prep)
    prep.set_defaults(func=cmd_corpus_prepare)


def cmd_corpus_tokenize(args: argparse.Namespace) -> int:
    from miniglm import shards, tokenizer

    check_output(args.out, [args.corpus, _local(args.tokenizer)], args.overwrite)
    tok = tokenizer.load_tokenizer(args.tokenizer)
    meta = shards.tokenize_corpus(args.corpus, tok, args.out)
    print(f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']}), "
          f"{meta['seconds']:.2f}s, {meta['mb_per_s']:.2f} MB/s -> {args.out}")
    return 0


def add_corpus_tokenize_parser(csub) -> None:
    tokz = csub.add_parser("tokenize", help="documents -> train.bin/val.bin token shards + meta.json",
                           description="Tokenise each document whole, joined by end-of-text, into flat shards.")
    tokz.add_argument("--corpus", required=True, help="folder written by `corpus prepare`")
    tokz.add_argument("--tokenizer", required=True, help="tokenizer folder, cl100k_base, FILE.tiktoken or HF name")
    tokz.add_argument("--out", required=True, help="output folder")
    _add_overwrite(tokz)
    tokz.set_defaults(func=cmd_corpus_tokenize)


def add_corpus_parser(sub) -> None:
    corpus = sub.add_parser("corpus", help="prepare and tokenize a pretraining corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="STEP")
    add_corpus_prepare_parser(csub)
    add_corpus_tokenize_parser(csub)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from miniglm import corpus, tokenizer

    if args.vocab_size < tokenizer.MIN_VOCAB_SIZE:  # before reading the corpus
        raise UserError(f"--vocab-size must be at least {tokenizer.MIN_VOCAB_SIZE} (256 bytes + specials), "
                        f"got {args.vocab_size}")
    check_output(args.out, [args.corpus], args.overwrite)
    docs = corpus.load_documents(f"{args.corpus}/train.jsonl")
    tok = tokenizer.train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency,
                              han_chars=args.han_chars)
    print(f"trained a byte-level BPE with {tok.vocab_size} tokens -> {args.out}/tokenizer.json")
    return 0


def add_tokenizer_train_parser(tsub) -> None:
    train = tsub.add_parser("train", help="train a byte-level BPE on a prepared corpus",
                            description="Byte-level BPE (GPT-2 split pattern) with end-of-text, pad and role tokens.")
    train.add_argument("--corpus", required=True, help="folder written by `corpus prepare`")
    train.add_argument("--vocab-size", type=at_least(1), default=8192)
    train.add_argument("--min-frequency", type=at_least(1), default=2)
    train.add_argument("--han-chars", action="store_true",
                       help="one token never spans two Chinese characters: a name is the same tokens in every "
                            "sentence (the demo's default; better recall of facts, ~2.8x more tokens per text)")
    train.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    _add_overwrite(train)
    train.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    from miniglm import corpus, tokenizer

    tok = tokenizer.load_tokenizer(args.tokenizer)
    rep = tokenizer.report(tok, corpus.load_documents(f"{args.corpus}/{args.split}.jsonl"))
    for key, value in rep.items():
        print(f"{key:<20} {value}")
    if rep["roundtrip_failures"]:
        print(f"round trip FAILED on {rep['roundtrip_failures']} document(s)", file=sys.stderr)
        return 1
    print("round trip OK: decode(encode(x)) == x for every document")
    return 0


def add_tokenizer_report_parser(tsub) -> None:
    rep = tsub.add_parser("report", help="characters/token and the round-trip check on a split",
                          description="Print compression and check decode(encode(x)) == x on every document.")
    rep.add_argument("--tokenizer", required=True, help="tokenizer folder, cl100k_base, FILE.tiktoken or HF name")
    rep.add_argument("--corpus", required=True, help="folder written by `corpus prepare`")
    rep.add_argument("--split", choices=["train", "val"], default="val")
    rep.set_defaults(func=cmd_tokenizer_report)


def add_tokenizer_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train or inspect a tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="STEP")
    add_tokenizer_train_parser(tsub)
    add_tokenizer_report_parser(tsub)


def cmd_world(args: argparse.Namespace) -> int:
    from miniglm import world

    check_output(args.out, overwrite=args.overwrite)
    stats = world.build_world(args.out, args.characters, args.bios, args.heldout_fraction, args.seed)
    print(json.dumps(stats.__dict__, ensure_ascii=False))
    print(f"wrote {args.out}/corpus.jsonl, characters.jsonl, sft_train.jsonl, sft_test.jsonl")
    return 0


def add_world_parser(sub) -> None:
    w = sub.add_parser("world", help="generate the synthetic wuxia world (corpus + Q&A)",
                       description="Invented characters with facts, biographies for pretraining and Q&A for SFT.")
    w.add_argument("--out", required=True)
    w.add_argument("--characters", type=at_least(4), default=500)
    w.add_argument("--bios", type=at_least(1), default=6, help="biographies per character")
    w.add_argument("--heldout-fraction", type=float, default=0.5, help="characters whose Q&A are held out")
    w.add_argument("--seed", type=int, default=1337)
    _add_overwrite(w)
    w.set_defaults(func=cmd_world)


def cmd_demo(args: argparse.Namespace) -> int:
    from miniglm.demo import DemoOptions, run_demo

    check_output(args.out, overwrite=args.overwrite)
    run_demo(DemoOptions(out=args.out, characters=args.characters, bios=args.bios,
                         vocab_size=args.vocab_size, seed=args.seed, questions=args.questions, overrides=args.set,
                         pretrain_overrides=args.set_pretrain, sft_overrides=args.set_sft, mix_qa=args.mix_qa,
                         han_chars=args.han_chars, long=args.long))
    return 0


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="run the whole pipeline on the synthetic world",
                       description="world -> corpus -> tokenizer -> shards -> pretrain -> SFT, into one run folder.")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--characters", type=at_least(4), default=500)
    d.add_argument("--bios", type=at_least(1), default=24, help="biographies per character")
    d.add_argument("--vocab-size", type=at_least(1), default=4096)
    d.add_argument("--seed", type=int, default=1337)
    d.add_argument("--questions", type=at_least(1), default=2250, help="questions per split asked at the end")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training key in both stages, e.g. --set max_steps=50")
    d.add_argument("--mix-qa", action=argparse.BooleanOptionalAction, default=True,
                   help="also pretrain on the training characters' Q&A (mixed training; default on)")
    d.add_argument("--han-chars", action=argparse.BooleanOptionalAction, default=True,
                   help="a token never spans two Chinese characters, so a name is the same tokens in a biography "
                        "and in an answer (default on; --no-han-chars: GPT-2's split, names fused with neighbours)")
    d.add_argument("--long", action="store_true",
                   help="pretrain six times longer (~45 minutes on 2 cores): where the knowledge probes saturate")
    d.add_argument("--set-pretrain", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the pretraining stage only (configs/demo.toml)")
    d.add_argument("--set-sft", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the SFT stage only (configs/demo-sft.toml)")
    _add_overwrite(d)
    d.set_defaults(func=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    from miniglm.config import load_config
    from miniglm.train import train

    cfg = load_config(args.config, args.set)
    if args.overwrite and cfg.out_dir:
        allow_overwrite(cfg.out_dir)
    summary = train(cfg)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="pretrain or fine-tune (SFT, LoRA) a MiniGLM",
                       description="One loop for pretraining and SFT; rerun the same command to resume.")
    t.add_argument("--config", default=None, help="TOML file (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set max_steps=100 --set model.n_layer=4")
    _add_overwrite(t)
    t.set_defaults(func=cmd_train)


def cmd_sft_prepare(args: argparse.Namespace) -> int:
    from miniglm.fileio import read_jsonl
    from miniglm.sft.data import prepare_sft, show
    from miniglm.sft.formats import column_fields, parse_values
    from miniglm.sft.templates import TemplateOptions
    from miniglm.tokenizer import load_tokenizer

    if (args.test_fraction is not None or args.test_count) and not args.test_out:
        raise UserError("--test-fraction and --test-count need --test-out FILE.jsonl (where the held-out records go)")
    check_output(args.out, [args.data, _local(args.tokenizer)], args.overwrite)
    if args.test_out:  # a file of records: any file there is replaced (b""), never an input or a folder
        check_output(args.test_out, [args.data, _local(args.tokenizer)], magic=b"")
    tok = load_tokenizer(args.tokenizer)
    opts = TemplateOptions(system=args.system, train_all_turns=not args.last_turn_only,
                           end_token=args.end_token, max_source_len=args.max_source_len,
                           max_target_len=args.max_target_len)
    opts = column_fields(args.data, args.columns, opts, args.encoding)  # plain: "{prompt column} : … {answer} : "
    meta = prepare_sft(args.data, tok, args.out, args.template, args.max_len, args.val_fraction, args.seed, opts,
                       args.pack, columns=args.columns, values=parse_values(args.value), encoding=args.encoding,
                       test_out=args.test_out, test_fraction=args.test_fraction or 0.05, test_count=args.test_count)
    if args.show:
        print(show([r for _, r in read_jsonl(f"{args.out}/train.jsonl")], tok, args.show))
    eff = f"{meta['padding_efficiency']:.1%}"
    if meta["packed_padding_efficiency"] is not None:
        eff += f" -> {meta['packed_padding_efficiency']:.1%} packed into {meta['sequences']} sequences"
    test = f" / {meta['test_records']} test -> {args.test_out}" if args.test_out else ""
    print(f"{meta['records']} records ({meta['train_records']} train / {meta['val_records']} val{test}), "
          f"{meta['truncated']} truncated, {meta['dropped']} dropped, {meta['tokens']:,} tokens "
          f"({meta['trained_tokens']:,} trained); padding efficiency at --max-len {args.max_len}: {eff} -> {args.out}")
    return 0


def add_sft_prepare_parser(ssub) -> None:
    sp = ssub.add_parser("prepare", help="SFT records -> ids + labels for training",
                         description="Render each record with a chat template (labels on answers only), "
                                     f"truncate, optionally pack. Records: {format_names()}, or any with "
                                     "--columns; JSON records (one array, or one object a line) in .json, "
                                     ".jsonl or .txt; .csv with --columns.")
    sp.add_argument("--data", required=True, help="a .json, .jsonl, .txt (JSON records) or .csv file of records")
    sp.add_argument("--tokenizer", required=True, help="tokenizer folder, cl100k_base, FILE.tiktoken or HF name")
    sp.add_argument("--template", default="miniglm",
                    help="miniglm | chatglm | chatglm2 | alpaca | plain | chatml | llama2 | hf (default: miniglm)")
    sp.add_argument("--max-len", type=at_least(2), default=256,
                    help="tokens per record: older history turns go first, then the prompt is cut (never the answer)")
    sp.add_argument("--pack", action="store_true", help="pack several records into each sequence")
    sp.add_argument("--show", type=at_least(0), default=0, metavar="K", help="print K records as token | label columns")
    sp.add_argument("--system", default=None, help="system prompt for chats that have none")
    sp.add_argument("--last-turn-only", action="store_true", help="train only the last assistant turn")
    _add_columns(sp)
    sp.add_argument("--end-token", choices=["eos", "pad"], default="eos", help="plain template: token after target")
    sp.add_argument("--max-source-len", type=at_least(0), default=0, help="chatglm: ChatGLM's max_source_length")
    sp.add_argument("--max-target-len", type=at_least(0), default=0, help="chatglm: ChatGLM's max_target_length")
    sp.add_argument("--val-fraction", type=fraction, default=0.05)
    sp.add_argument("--test-out", default=None, metavar="FILE.jsonl",
                    help="hold out records for evaluation: written unrendered here (miniglm eval --data reads it)")
    sp.add_argument("--test-fraction", type=fraction, default=None, help="share of records held out (default 0.05)")
    sp.add_argument("--test-count", type=at_least(0), default=0, help="number of records held out (instead of a share)")
    sp.add_argument("--seed", type=int, default=1337)
    _add_encoding(sp, "--data")
    sp.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, meta.json)")
    _add_overwrite(sp)
    sp.set_defaults(func=cmd_sft_prepare)


# --- sft generate: three steps over an OpenAI-compatible API, sharing the client's flags -------------
def _client_options(args: argparse.Namespace) -> ClientOptions:
    """The API client's flags (_add_client_options), checked: every sft generate step's."""
    for flag, value, low in (("--concurrency", args.concurrency, 1), ("--max-retries", args.max_retries, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be greater than 0, got {args.timeout}")
    return ClientOptions(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                         system_prompt=args.system_prompt, temperature=args.temperature,
                         concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                         base_delay=args.retry_base_delay, max_delay=args.retry_max_delay)


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output jsonl; appended to, so rerunning the command resumes")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
                   help="OpenAI-compatible API, e.g. http://localhost:8000/v1 for vLLM "
                        "(default: $OPENAI_BASE_URL or %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default: %(default)s)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="system message ('' for none)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries on 429/5xx/time-outs/connection errors and on malformed answers (default: 5)")
    p.add_argument("--retry-base-delay", type=float, default=1.0, help="first back-off in seconds (default: 1)")
    p.add_argument("--retry-max-delay", type=float, default=30.0, help="longest back-off in seconds (default: 30)")
    p.add_argument("--dedup-threshold", type=float, default=0.9,
                   help="drop a question whose character-bigram Jaccard similarity to an earlier one is at "
                        "least this (default: 0.9; above 1 drops only exact duplicates)")


def cmd_sft_generate_questions(args: argparse.Namespace) -> int:
    from miniglm.sft.prompts import QUESTION_FIELDS, QUESTION_PROMPT, prompt_template
    from miniglm.sft.synth import generate_questions, read_titles

    titles = args.titles or read_titles(args.titles_file)
    prompt = prompt_template(args.question_prompt, QUESTION_PROMPT, QUESTION_FIELDS, ("title", "n"),
                             "--question-prompt")
    s = generate_questions(titles, args.out, args.per_title, aspects=args.aspects, options=_client_options(args),
                           dedup_threshold=args.dedup_threshold, prompt=prompt)
    return 1 if s.failed else 0


def add_sft_generate_questions_parser(gsub) -> None:
    q = gsub.add_parser("questions", help="titles or topics -> questions jsonl",
                        description="Ask for --per-title questions per title, split over the aspects; "
                                    "near-duplicate questions are dropped.")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--titles", nargs="+", metavar="TITLE", help="novel titles, characters or topics")
    src.add_argument("--titles-file", metavar="FILE", help="one title a line (# starts a comment)")
    q.add_argument("--per-title", type=int, default=60, help="questions per title (default: 60)")
    q.add_argument("--aspects", nargs="+", default=list(ASPECTS), metavar="ASPECT",
                   help="aspects to split the questions over (default: %(default)s)")
    q.add_argument("--question-prompt", metavar="TEXT|@FILE",
                   help="the request, a template over {title} {aspect} {hint} {n} (default: the Chinese Jin Yong "
                        "prompt; {hint} is empty for aspects outside the defaults)")
    _add_client_options(q)
    q.set_defaults(func=cmd_sft_generate_questions)


def cmd_sft_generate_answers(args: argparse.Namespace) -> int:
    from miniglm.sft.prompts import ANSWER_FIELDS, ANSWER_PROMPT, prompt_template
    from miniglm.sft.synth import generate_answers

    prompt = prompt_template(args.answer_prompt, ANSWER_PROMPT, ANSWER_FIELDS, ANSWER_FIELDS, "--answer-prompt")
    s = generate_answers(args.questions, args.out, options=_client_options(args), dedup_threshold=args.dedup_threshold,
                         prompt=prompt)
    return 1 if s.failed else 0


def add_sft_generate_answers_parser(gsub) -> None:
    a = gsub.add_parser("answers", help="questions jsonl -> question/answer jsonl",
                        description="Answer each question record; other fields of the record are kept.")
    a.add_argument("--questions", required=True, metavar="FILE", help="jsonl with a 'question' field")
    a.add_argument("--answer-prompt", metavar="TEXT|@FILE",
                   help="the request, a template over {question} (default: the Chinese prompt)")
    _add_client_options(a)
    a.set_defaults(func=cmd_sft_generate_answers)


def cmd_sft_generate_passages(args: argparse.Namespace) -> int:
    from miniglm.sft.synth import generate_passage_qa

    s = generate_passage_qa(args.corpus, args.out, args.chunk_chars, args.per_chunk, text_field=args.text_field,
                            options=_client_options(args), dedup_threshold=args.dedup_threshold)
    return 1 if s.failed else 0


def add_sft_generate_passages_parser(gsub) -> None:
    p = gsub.add_parser("passages", help="corpus -> question/answer pairs grounded in its passages",
                        description="Cut documents into chunks at sentence ends and ask for Q&A pairs (as JSON) "
                                    "grounded in each chunk.")
    p.add_argument("--corpus", required=True, metavar="FILE",
                   help="jsonl of {'text'} documents (from `corpus prepare`), a folder of them, or a UTF-8 .txt")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl (default: text)")
    p.add_argument("--chunk-chars", type=int, default=800, help="characters per chunk, about (default: 800)")
    p.add_argument("--per-chunk", type=int, default=3, help="Q&A pairs per chunk (default: 3)")
    _add_client_options(p)
    p.set_defaults(func=cmd_sft_generate_passages)


def add_sft_generate_parser(ssub) -> None:
    gen = ssub.add_parser(
        "generate", help="generate Q&A with an OpenAI-compatible chat API",
        description="Generate SFT data with any OpenAI-compatible chat API. Records are appended as they "
                    "arrive; rerun the same command to resume. The API key is read from an environment variable.")
    gsub = gen.add_subparsers(dest="generate_command", required=True, metavar="STEP")
    add_sft_generate_questions_parser(gsub)
    add_sft_generate_answers_parser(gsub)
    add_sft_generate_passages_parser(gsub)


def add_sft_parser(sub) -> None:
    sft = sub.add_parser("sft", help="prepare SFT data")
    ssub = sft.add_subparsers(dest="sft_command", required=True, metavar="STEP")
    add_sft_prepare_parser(ssub)
    add_sft_generate_parser(ssub)


def cmd_finetune(args: argparse.Namespace) -> int:
    from miniglm.finetune import FinetuneOptions, finetune
    from miniglm.sft.formats import parse_values
    from miniglm.sft.templates import TemplateOptions

    if args.full and args.lora_r is not None:
        raise UserError("--full and --lora-r exclude each other: LoRA trains adapters, --full every weight")
    check_output(args.out, [args.data, _local(args.model)], args.overwrite, grow=True)
    topts = TemplateOptions(system=args.system, end_token=args.end_token)
    opts = FinetuneOptions(model=args.model, data=args.data, out=args.out, template=args.template,
                           lora_r=0 if args.full else (args.lora_r or 8), max_len=args.max_len,
                           val_fraction=args.val_fraction, seed=args.seed, trust_remote_code=args.trust_remote_code,
                           columns=args.columns, values=parse_values(args.value), template_options=topts,
                           overrides=args.set, encoding=args.encoding)
    summary = finetune(opts)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


def add_finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a Hugging Face model (LoRA or full) on SFT data",
                        description="sft prepare with the model family's template + train (stage sft) in one "
                                    "command, into one run folder; rerun it to resume. Families: bloom, gpt2, "
                                    "gpt2-chinese, opt, llama (Chinese-LLaMA/Alpaca), qwen2, chatglm, glm4.")
    ft.add_argument("--model", required=True, help="HF model name (downloaded when online) or local folder")
    ft.add_argument("--data", required=True, help="SFT records: .json, .jsonl, .txt (JSON records) or .csv")
    ft.add_argument("--out", required=True, help="run folder (RUN/data holds the prepared records)")
    ft.add_argument("--template", default="auto", help="auto (the family's) or a template name, as in sft prepare")
    ft.add_argument("--lora-r", type=at_least(1), default=None, help="LoRA rank (default 8)")
    ft.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    ft.add_argument("--trust-remote-code", action="store_true",
                    help="run the model repository's own code (ChatGLM-6B); only for repositories you trust")
    ft.add_argument("--max-len", type=at_least(2), default=256,
                    help="tokens per record; the prompt is cut, never the answer")
    _add_columns(ft)
    ft.add_argument("--system", default=None, help="system prompt for chats that have none")
    ft.add_argument("--end-token", choices=["eos", "pad"], default="eos", help="plain template: token after target")
    ft.add_argument("--val-fraction", type=fraction, default=0.05)
    ft.add_argument("--seed", type=int, default=1337)
    _add_encoding(ft, "--data")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training key, e.g. --set max_steps=50 --set lr=1e-4 --set lora_targets=c_attn")
    _add_overwrite(ft)
    ft.set_defaults(func=cmd_finetune)


def cmd_merge(args: argparse.Namespace) -> int:
    from miniglm import runs
    from miniglm.checkpoint import save_run

    check_output(args.out, runs.run_inputs(args.run), args.overwrite)
    run = runs.open_run(args.run)
    if not runs.has_adapter(run):
        raise UserError(f"{args.run}: no LoRA adapter to merge (its weights are whole already); use the run as it "
                        "is, or `miniglm export` it")
    chat = runs.read_chat(run.dir)  # the merged model chats with the template it was tuned with
    if run.hf:  # a transformers folder (from_pretrained loads it) that is also a run
        from miniglm.hf import merge_run

        tok = runs.load_run_tokenizer(run)
        out = merge_run(runs.load_model(run), tok, run.state, run.ckpt, chat, args.out)
        print(f"merged the adapter into the weights -> {out} (a transformers model folder)")
        return 0
    vocab = runs.read_model_config(run.ckpt).vocab_size
    tok = runs.load_run_tokenizer(run, vocab) if (run.dir / "tokenizer").exists() else None
    save_run(args.out, runs.load_model(run), {**run.state, "merged_from": str(run.ckpt)}, tok, chat)
    print(f"merged the adapter into the weights -> {args.out}/ckpt")
    return 0


def add_merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into full weights",
                       description="Load a run's adapter over its base model, merge, save full weights. For a "
                                   "Hugging Face run (finetune): OUT is a transformers model folder.")
    m.add_argument("run", help="run or checkpoint folder with an adapter")
    m.add_argument("--out", required=True)
    _add_overwrite(m)
    m.set_defaults(func=cmd_merge)


def cmd_plot(args: argparse.Namespace) -> int:
    from miniglm.plot import plot_losses

    print(f"wrote {plot_losses(args.run, args.out)}")
    return 0


def add_plot_parser(sub) -> None:
    pl = sub.add_parser("plot", help="plot a run's loss curves (PNG)", description="metrics.jsonl -> loss.png")
    pl.add_argument("run")
    pl.add_argument("--out", default=None, help="default: RUN/loss.png")
    pl.set_defaults(func=cmd_plot)


def cmd_import_ckpt(args: argparse.Namespace) -> int:
    from miniglm.export import import_nanogpt
    from miniglm.gguf_import import is_gguf

    check_output(args.out, [args.ckpt, _local(args.tokenizer)], args.overwrite)
    if is_gguf(args.ckpt):
        return _import_gguf(args)
    if args.max_context is not None:
        raise UserError("--max-context is for GGUF files (a ckpt.pt keeps its block size)")
    model = import_nanogpt(args.ckpt, args.out, args.tokenizer)
    print(f"imported a gpt2-style MiniGLM ({model.num_params():,} parameters) -> {args.out}/ckpt")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from miniglm.gguf_import import DEFAULT_CONTEXT, import_gguf

    if args.tokenizer:
        raise UserError("a GGUF file carries its own tokenizer; drop --tokenizer")
    model, info = import_gguf(args.ckpt, args.out, args.max_context or DEFAULT_CONTEXT,
                              note=lambda msg: print(f"miniglm: note: {msg}", file=sys.stderr))
    c = model.config
    template = "its own chat template (hf)" if info["chat_template"] else "no chat template (raw text)"
    print(f"imported a llama-style MiniGLM ({model.num_params():,} parameters, {c.n_layer} layers, "
          f"context {c.block_size} of {info['trained_context']}) -> {args.out}/ckpt; "
          f"tokenizer byte-level BPE ({info['pre_tokenizer']} pre-tokenizer), {template}")
    return 0


def add_import_ckpt_parser(sub) -> None:
    ic = sub.add_parser("import-ckpt", help="import a seed (nanoGPT-style) ckpt.pt or a llama GGUF",
                        description="Read a nanoGPT/MiniGLM ckpt.pt (weights_only) into a gpt2-style run, or a "
                                    "llama-architecture .gguf (weights dequantized to fp32, its tokenizer and chat "
                                    "template) into a llama-style run.")
    ic.add_argument("ckpt", help="ckpt.pt or FILE.gguf")
    ic.add_argument("--out", required=True)
    ic.add_argument("--tokenizer", default=None, help="tokenizer to store with the run (the seed used cl100k_base)")
    ic.add_argument("--max-context", type=int, default=None,
                    help="GGUF: the run's context (default 2048, or the model's own if shorter)")
    _add_overwrite(ic)
    ic.set_defaults(func=cmd_import_ckpt)


def cmd_export(args: argparse.Namespace) -> int:
    from miniglm.export import export_gguf, export_hf
    from miniglm.runs import run_inputs

    if args.to == "gguf":
        check_output(args.out, run_inputs(args.run), args.overwrite, magic=b"GGUF")
        path = export_gguf(args.run, args.out, args.outtype)
        print(f"exported GGUF ({args.outtype.upper()}) for llama.cpp -> {path}")
    else:
        check_output(args.out, run_inputs(args.run), args.overwrite)
        print(f"exported a transformers model -> {export_hf(args.run, args.out)}")
    return 0


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="export a run to Hugging Face transformers or GGUF",
                        description="Write config.json, model.safetensors and the tokenizer; loads with "
                                    "AutoModelForCausalLM (GPT2LMHeadModel or LlamaForCausalLM).")
    ex.add_argument("--run", required=True, help="run or checkpoint folder")
    ex.add_argument("--to", choices=["hf", "gguf"], default="hf",
                    help="hf: a transformers folder; gguf: one .gguf file for llama.cpp (llama style)")
    ex.add_argument("--out", required=True, help="output folder (hf) or file (gguf)")
    ex.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f32",
                    help="GGUF weight type (matrices; norms stay F32)")
    _add_overwrite(ex)
    ex.set_defaults(func=cmd_export)


def _sampling(args: argparse.Namespace):
    """The sampling flags, range-checked by SamplingParams.validate (the server's check too)."""
    from miniglm.engine import SamplingError, SamplingParams

    # By default an answer gets up to 128 tokens, fewer where the context leaves less room; an explicit
    # --max-new-tokens past the room is capped too, with a note on stderr.
    max_new = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    params = SamplingParams(max_new_tokens=max_new, fit_new_tokens=True, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop_strings=args.stop or [], seed=args.seed, trim_prompt=args.trim_prompt,
                            skip_special_tokens=not args.keep_special)
    try:
        params.validate()
    except SamplingError as e:
        flag = "--stop" if e.field == "stop_strings" else "--" + e.field.replace("_", "-")
        raise UserError(f"{flag} {e.rule}") from None
    _check_batch_size(args)
    return params


def _check_batch_size(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise UserError("--batch-size must be at least 1")


def _note(args: argparse.Namespace):
    """Where a note for the user goes: stderr, and only about what they asked for explicitly."""
    if args.max_new_tokens is None:
        return None
    return lambda msg: print(f"miniglm: note: {msg}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from miniglm.chat import generate_texts, load_run
    from miniglm.fileio import read_text

    if args.file:
        texts = [line.strip() for line in read_text(args.file, args.encoding).splitlines() if line.strip()]
        if not texts:
            raise UserError(f"{args.file}: no prompts (one a line)")
    else:
        texts = [args.prompt]
    params = _sampling(args)
    run = load_run(args.run, args.device, args.raw, args.int8, args.compile)
    for r in generate_texts(run, texts, params, args.batch_size, args.system, _note(args)):
        print(json.dumps(r, ensure_ascii=False) if args.jsonl else r["output"], flush=True)
    return 0


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with a run's model",
                       description="One output per prompt, rendered with the run's chat template (batched).")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", help="a text file, one prompt per line")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--batch-size", type=int, default=8)
    _add_encoding(g, "--file")
    g.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    _add_sampling(g)
    _add_compile(g)
    g.set_defaults(func=cmd_generate)


def cmd_chat(args: argparse.Namespace) -> int:
    from miniglm.chat import chat_repl, load_run

    params = _sampling(args)
    chat_repl(load_run(args.run, args.device, args.raw, args.int8, args.compile), params,
              read=_stdin_reader(args.encoding))
    return 0


def _stdin_reader(encoding: str | None):
    """input() whose bytes are decoded as fileio.read_text decodes a file: a line that is not UTF-8 (or not
    --encoding) is an error naming the byte and the fix, not a UnicodeDecodeError."""
    from miniglm.fileio import decode_text

    if encoding is not None:
        decode_text(b"", "stdin", encoding)  # an unknown --encoding fails before the model loads
    if hasattr(sys.stdin, "reconfigure"):  # keep the bytes that do not decode, to name them
        sys.stdin.reconfigure(encoding=encoding or "utf-8", errors="surrogateescape")

    count = 0  # lines read so far: an error names the line it is on

    def read(prompt: str) -> str:
        nonlocal count
        line = input(prompt)
        count += 1
        if any("\udc80" <= ch <= "\udcff" for ch in line):
            decode_text(line.encode(sys.stdin.encoding, "surrogateescape"), "stdin", encoding, line=count)
        return line
    return read


def add_chat_parser(sub) -> None:
    c = sub.add_parser("chat", help="chat with a run in the terminal",
                       description="Multi-turn chat with streaming output; /reset, /system TEXT, /exit.")
    _add_sampling(c)
    _add_compile(c)
    _add_encoding(c, "what you type (stdin)")
    c.set_defaults(func=cmd_chat)


def _eval_out(args: argparse.Namespace, data: str | None) -> None:
    from pathlib import Path

    from miniglm.runs import run_inputs

    check_output(args.out or Path(args.run) / "eval", [*run_inputs(args.run), data], args.overwrite)


def cmd_eval(args: argparse.Namespace) -> int:
    from miniglm.evaluate import evaluate_generation
    from miniglm.sft.formats import parse_values

    if not args.run or not args.data:
        raise UserError("miniglm eval needs --run DIR and --data FILE (or a subcommand: ppl, classify)")
    _eval_out(args, args.data)
    params = _sampling(args)
    evaluate_generation(args.run, args.data, args.out, args.template, params,
                        None if args.embedder == "none" else args.embedder, args.limit, args.batch_size,
                        columns=args.columns, values=parse_values(args.value), note=_note(args),
                        encoding=args.encoding, device=args.device)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from miniglm.evaluate import evaluate_perplexity

    _eval_out(args, args.text)
    evaluate_perplexity(args.run, args.text, args.stride, args.out, encoding=args.encoding, device=args.device)
    return 0


def add_eval_ppl_parser(evsub) -> None:
    pp = evsub.add_parser("ppl", help="perplexity and bits per byte over held-out text (sliding window)",
                          description="Tokens scored once each, with a window of the model's context moved by "
                                      "--stride tokens.")
    pp.add_argument("--run", required=True, help="run or checkpoint folder")
    pp.add_argument("--text", required=True, help=".txt file, or .jsonl documents with a text field")
    pp.add_argument("--stride", type=at_least(0), default=0, help="window step in tokens (default: half the context)")
    pp.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    _add_encoding(pp, "--text")
    _add_device(pp)
    _add_overwrite(pp)
    pp.set_defaults(func=cmd_eval_ppl)


def cmd_eval_classify(args: argparse.Namespace) -> int:
    from miniglm.evaluate import evaluate_classification
    from miniglm.sft.formats import parse_values

    _check_batch_size(args)
    _eval_out(args, args.data)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    evaluate_classification(args.run, args.data, labels, args.out, args.template, args.batch_size,
                            columns=args.columns, values=parse_values(args.value), encoding=args.encoding,
                            system=args.system, device=args.device)
    return 0


def add_eval_classify_parser(evsub) -> None:
    cl = evsub.add_parser("classify", help="accuracy and per-class precision/recall, labels as text",
                          description="Generate a short answer per record, snap it to the closest label, score.")
    cl.add_argument("--run", required=True, help="run or checkpoint folder")
    cl.add_argument("--data", required=True, help="records whose answer is the label (JSON records, .csv)")
    _add_columns(cl)
    cl.add_argument("--labels", default=None, help="comma-separated labels (default: those in the data)")
    cl.add_argument("--template", default=None, help="render prompts with this template (default: the run's)")
    cl.add_argument("--system", default=None, help="an instruction for every prompt (zero-shot), e.g. "
                    "'Answer complaint or no complaint.': the system prompt; plain: a line before the record")
    cl.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    cl.add_argument("--batch-size", type=int, default=32)
    _add_encoding(cl, "--data")
    _add_device(cl)
    _add_overwrite(cl)
    cl.set_defaults(func=cmd_eval_classify)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="score a run: generation metrics, perplexity, classification",
                        description="Answer a test set (any SFT record format) with the run, greedy by default, and "
                                    "score: exact match, answer contained, ROUGE-1/2/L F1 on jieba words, BLEU-4 on "
                                    "characters, embedding similarity. Writes RUN/eval/predictions.jsonl, "
                                    "metrics.json, report.md and report.html.")
    ev.add_argument("--data", help="test records (JSON: question/answer, messages, alpaca, ..., or --columns; .csv)")
    _add_columns(ev)
    ev.add_argument("--template", default=None, help="render prompts with this template (default: the run's)")
    ev.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    ev.add_argument("--embedder", default="use-multilingual",
                    help="embedding model for similarity: use-multilingual (offline, default), a "
                         "sentence-transformers name or path, or none")
    ev.add_argument("--limit", type=at_least(0), default=0, help="only the first N records")
    _add_encoding(ev, "--data")
    ev.add_argument("--batch-size", type=int, default=32)
    _add_sampling(ev, run_required=False)
    _add_overwrite(ev)
    ev.set_defaults(func=cmd_eval)
    evsub = ev.add_subparsers(dest="eval_command", metavar="{ppl,classify}")
    add_eval_ppl_parser(evsub)
    add_eval_classify_parser(evsub)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from miniglm.report import write_comparison, write_report

    if len(args.runs) > 2:
        raise UserError("miniglm report takes one run, or two to compare")
    md, page = write_report(Path(args.runs[0]) / "eval") if len(args.runs) == 1 else write_comparison(*args.runs)
    print(f"wrote {md} and {page}")
    return 0


def add_report_parser(sub) -> None:
    rp = sub.add_parser("report", help="rebuild an evaluation report, or compare two runs",
                        description="RUN: RUN/eval/report.md + report.html. RUN_A RUN_B: side by side, written "
                                    "to RUN_A/eval/compare-<RUN_B>.md/.html.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="one run, or two to compare")
    rp.set_defaults(func=cmd_report)


DEFAULT_API_KEY_ENV = "MINIGLM_API_KEY"


def cmd_serve(args: argparse.Namespace) -> int:
    from miniglm.serve import serve

    # A key that was asked for (--api-key, --api-key-env, or MINIGLM_API_KEY set) must be there: an empty or
    # unset one never starts the server open. Nothing asked for: open, and serve() says so in one line.
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif args.api_key_env is not None:
        key, source = os.environ.get(args.api_key_env), f"--api-key-env {args.api_key_env}"
        if key is None:
            raise UserError(f"{source}: the variable {args.api_key_env} is not set (the server would have no key)")
    else:
        key, source = os.environ.get(DEFAULT_API_KEY_ENV), DEFAULT_API_KEY_ENV
    if key is not None and not key.strip():
        raise UserError(f"{source}: the API key is empty (the server would have no key)")
    serve(args.run, args.host, args.port, key, args.device, args.max_batch, args.int8, args.max_body)
    return 0


def add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible API and a web chat page for a run",
                        description="FastAPI + uvicorn: /v1/chat/completions, /v1/completions, /v1/models, "
                                    "/health, and a chat page at /. Concurrent requests decode in one batch.")
    sv.add_argument("--run", required=True, help="run or checkpoint folder")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    sv.add_argument("--api-key-env", default=None, metavar="NAME",
                    help=f"or read the key from this variable (default {DEFAULT_API_KEY_ENV}, if it is set); "
                         "an unset or empty one refuses to start")
    sv.add_argument("--max-batch", type=at_least(1), default=32,
                    help="requests decoded together; more wait in order for a free row (default 32)")
    sv.add_argument("--max-body", type=at_least(1), default=1 << 20, metavar="BYTES",
                    help="refuse request bodies over this size with a 413 (default 1 MiB)")
    _add_device(sv)
    sv.add_argument("--int8", action="store_true", help="int8 weights on CPU: ~2x faster decoding")
    sv.set_defaults(func=cmd_serve)


# Every command, in the order `miniglm --help` lists them: each adds its parser, which names its cmd_ function.
COMMANDS = (add_corpus_parser, add_tokenizer_parser, add_world_parser, add_demo_parser, add_train_parser,
            add_sft_parser, add_finetune_parser, add_merge_parser, add_plot_parser, add_import_ckpt_parser,
            add_generate_parser, add_chat_parser, add_serve_parser, add_eval_parser, add_report_parser,
            add_export_parser)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="miniglm", description="Build small Chinese chat models end to end.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def command_name(args: argparse.Namespace) -> str:
    """"corpus tokenize", "eval ppl", ...: the name a folder's marker records."""
    sub = [getattr(args, k, None) for k in ("corpus_command", "tokenizer_command", "sft_command", "eval_command")]
    return " ".join([args.command, *(s for s in sub if s)])


class StdoutError(Exception):
    """Writing to stdout failed (a closed pipe, a full disk): not an OSError, so no command mistakes it for
    one of its own files."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class _Stdout:
    """sys.stdout during a command: its OSErrors become StdoutError, for main to answer once."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutError(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutError(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what the shell reports for `yes | head -1`'s yes


def _stdout_failed(e: StdoutError, stream) -> int:
    """A reader that went away (`miniglm ... | head -1`) ends the command quietly, as Unix tools end, with
    the status of one killed by SIGPIPE; any other failure (a full disk, a closed stdout) is one line on
    stderr and status 2. What is left in the buffer goes to /dev/null, so the exit adds no second error."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to flush at exit
        pass
    if isinstance(e.error, BrokenPipeError):
        return SIGPIPE_STATUS
    from miniglm.fileio import output_error

    print(f"miniglm: error: {output_error('stdout', e.error)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = sys.stdout
    if stream is None:  # started with stdout closed (`miniglm ... >&-`): what it prints would be lost
        print("miniglm: error: stdout is closed; redirect it to a file or to /dev/null", file=sys.stderr)
        return 2
    begin_command(command_name(args))
    sys.stdout = _Stdout(stream)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not as an error at exit
        return code
    except StdoutError as e:
        return _stdout_failed(e, stream)
    except UserError as e:  # one line, even where it quotes a library's message of several
        print(f"miniglm: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; 1: the work itself failed (a diverged training)
    except KeyboardInterrupt:
        print("miniglm: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stream
        end_command()


if __name__ == "__main__":
    sys.exit(main())
