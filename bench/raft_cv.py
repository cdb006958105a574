"""RAFT twitter_complaints as generation, seed 002's layout ("Tweet text : … Label : " → complaint /
no complaint; left padding; -100 on the prompt; long tweets lose their end, never the label), scored
with 5-fold cross-validation over the 50 labelled rows beside the majority baseline.

Each fold writes its train/test csv (with RAFT's task.json, so the columns name themselves) into a
temporary folder and goes through the CLI, as a user would:

  tiny   a random-init GPT-2 (byte-level BPE trained on the tweets' text) built from a config and saved
         with save_pretrained  ->  `miniglm finetune --full`  ->  `miniglm eval classify`
  demo   the demo's pretrained MiniGLM  ->  `miniglm sft prepare --template plain` + `miniglm train
         --config configs/demo-sft.toml --set init_from=DEMO/pretrain ...`  ->  `miniglm eval classify`

  On a real pretrained instruct model (--model: a MiniGLM run such as an imported SmolLM2, or its
  transformers export), every prompt carrying an instruction (--instruction) in the model's own template:
  zero-shot       `miniglm eval classify --system INSTRUCTION` (the chat template; zero-shot-plain: the
                  plain template with the instruction on a line before "Tweet text : … Label : ")
  lora / full     `miniglm finetune --template hf --system INSTRUCTION` (LoRA r 8 on q/v, or every weight)
                  on the transformers export (`miniglm export --to hf`, made here from a run)

The demo run must exist (`miniglm demo` makes runs/demo in a few minutes); the bench does not build it.

    .venv/bin/python bench/raft_cv.py [--demo-run runs/demo] [--steps 100] [--models tiny,demo]
    .venv/bin/python bench/raft_cv.py --model runs/smollm2 --models zero-shot,lora,full --steps 20 \
        --finetune-folds 2   # long (a 135M step is ~8 s on 2 cores)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, record, table  # noqa: E402

from miniglm.cli import main as cli  # noqa: E402
from miniglm.fileio import UserError, read_json  # noqa: E402

RAFT = SHARED_DATA / "classify" / "raft_twitter_complaints"
TEXT, LABEL = "Tweet text", "Label"
LABELS = ["complaint", "no complaint"]
INSTRUCTION = ("Is this tweet a complaint about a company's product or service? "
               "Answer with exactly one label: complaint or no complaint.")
REAL = ("zero-shot", "zero-shot-plain", "lora", "full")  # the kinds run on --model


# --- data ----------------------------------------------------------------------------------------
def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: Path, header: list[str], rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        w.writerows(rows)
    return path


def stratified_folds(labels: list[str], k: int, seed: int) -> list[list[int]]:
    """Row indices in k folds: each label's rows shuffled (seeded) and dealt round-robin, so every fold
    keeps the label mix; the deal continues across labels so fold sizes differ by at most one."""
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    n = 0
    for label in sorted(set(labels)):
        idx = [i for i, x in enumerate(labels) if x == label]
        rng.shuffle(idx)
        for i in idx:
            folds[n % k].append(i)
            n += 1
    return [sorted(f) for f in folds]


def cli_ok(argv: list[str]) -> None:
    rc = cli([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"miniglm {' '.join(map(str, argv[:2]))} failed with exit code {rc}")


# --- models --------------------------------------------------------------------------------------
def tiny_gpt2(out: Path, texts: list[str], vocab_size: int = 1024, n_layer: int = 2, n_embd: int = 64,
              n_positions: int = 256, seed: int = 0) -> Path:
    """A random-init GPT-2 with a byte-level BPE trained on `texts` (the repo's train_bpe), saved as a
    transformers folder: what `miniglm finetune --model` loads. Built offline, in seconds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from miniglm.tokenizer import train_bpe

    train_bpe(texts, vocab_size, out / "bpe")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "bpe" / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")  # no pad token, as GPT-2: pads with EOS
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    shutil.rmtree(out / "bpe")
    return out / "model"


def finetune_tiny(model: Path, train_csv: Path, run: Path, steps: int, max_len: int = 128,
                  extra: list[str] = ()) -> Path:
    """`miniglm finetune --full`: the gpt2 family's plain template, left padding."""
    cli_ok(["finetune", "--model", model, "--data", train_csv, "--out", run, "--full", "--max-len", max_len,
            "--val-fraction", "0.05", "--set", f"max_steps={steps}", "--set", "lr=1e-3", "--set", "min_lr=1e-4",
            "--set", "batch_size=8", "--set", "warmup_steps=10", "--set", f"eval_every={steps}",
            "--set", "eval_batches=1", "--set", f"log_every={max(steps // 4, 1)}", "--set", "threads=1", *extra])
    return run


def sft_demo(demo: Path, train_csv: Path, run: Path, steps: int, extra: list[str] = ()) -> Path:
    """`sft prepare --template plain` with the demo's tokenizer, then `train` from DEMO/pretrain with the
    demo's SFT config; records cut to the model's context (the prompt's end goes, never the label)."""
    from miniglm.config import load_config

    block = load_config(demo / "pretrain" / "config.toml").model.block_size
    data = run.with_name(run.name + "-data")
    cli_ok(["sft", "prepare", "--data", train_csv, "--tokenizer", demo / "tokenizer", "--template", "plain",
            "--max-len", block + 1, "--val-fraction", "0.05", "--out", data])
    cli_ok(["train", "--config", ROOT / "configs" / "demo-sft.toml", "--set", f"data={data}",
            "--set", f"init_from={demo / 'pretrain'}", "--set", f"out_dir={run}", "--set", f"max_steps={steps}",
            "--set", "batch_size=16", "--set", "lr=1e-3", "--set", "min_lr=1e-4",
            "--set", "warmup_steps=10", "--set", f"eval_every={steps}",
            "--set", "eval_batches=1", "--set", f"log_every={max(steps // 4, 1)}", "--set", "threads=1", *extra])
    return run


def finetune_real(model: Path, train_csv: Path, run: Path, steps: int, full: bool, instruction: str,
                  extra: list[str] = ()) -> Path:
    """`miniglm finetune` of a pretrained instruct model in its own chat template (hf), the instruction as
    the system prompt: LoRA (r 8 on q_proj/v_proj, lr 1e-3) or every weight (lr 5e-5); batch 8."""
    cli_ok(["finetune", "--model", model, "--data", train_csv, "--out", run, "--template", "hf",
            "--system", instruction, "--max-len", 160, "--val-fraction", "0.05", *(["--full"] if full else []),
            "--set", f"max_steps={steps}", "--set", f"lr={5e-5 if full else 1e-3}",
            "--set", f"min_lr={5e-6 if full else 1e-4}", "--set", "batch_size=8", "--set", "warmup_steps=2",
            "--set", f"eval_every={steps}", "--set", "eval_batches=1", "--set", f"log_every={max(steps // 4, 1)}",
            "--set", "threads=1", *extra])
    return run


def classify(run: Path, test_csv: Path, out: Path, extra: list[str] = ()) -> dict:
    cli_ok(["eval", "classify", "--run", run, "--data", test_csv, "--labels", ",".join(LABELS), "--out", out,
            *extra])
    return read_json(out / "metrics.json")


# --- cross-validation ----------------------------------------------------------------------------
def cross_validate(model: str, work: Path, k: int = 5, seed: int = 1337, steps: int = 100, folds: int | None = None,
                   demo: Path | None = None, tiny: Path | None = None, data: Path = RAFT,
                   extra: list[str] = (), real: Path | None = None, real_hf: Path | None = None,
                   instruction: str = INSTRUCTION) -> dict:
    """Fine-tune `model` ("tiny", "demo", "lora", "full") on k-1 folds, or not ("zero-shot*": the `real`
    run as it is), and score the held-out fold, for each fold (or the first `folds` of them).
    Returns per-fold accuracies, macro-F1s, minutes and majority baselines."""
    header, rows = read_csv(data / "train.csv")
    rows = [r for r in rows if r.get(LABEL, "").strip()]  # the labelled rows
    labels = [r[LABEL].strip() for r in rows]
    parts = stratified_folds(labels, k, seed)
    result: dict = {"model": model, "k": k, "seed": seed, "steps": steps, "rows": len(rows), "folds": [],
                    "majority_overall": Counter(labels).most_common(1)[0][1] / len(labels)}
    t0 = time.perf_counter()
    for f, test_idx in enumerate(parts[:folds or k]):
        t_fold = time.perf_counter()
        fold = work / f"{model}-fold{f}"
        held = set(test_idx)
        train_rows = [r for i, r in enumerate(rows) if i not in held]
        test_rows = [rows[i] for i in test_idx]
        train_csv = write_csv(fold / "train" / "train.csv", header, train_rows)
        test_csv = write_csv(fold / "test" / "test.csv", header, test_rows)
        for d in (train_csv.parent, test_csv.parent):  # RAFT's task.json names the columns, as beside the data
            shutil.copyfile(data / "task.json", d / "task.json")
        eval_extra = ["--system", instruction] if model in REAL else []
        if model == "tiny":
            run = finetune_tiny(tiny, train_csv, fold / "run", steps, extra=extra)
        elif model == "demo":
            run = sft_demo(demo, train_csv, fold / "run", steps, extra=extra)
        elif model in ("lora", "full"):
            run = finetune_real(real_hf, train_csv, fold / "run", steps, model == "full", instruction, extra)
        else:
            run = real
            eval_extra += ["--template", "plain"] if model == "zero-shot-plain" else []
        metrics = classify(run, test_csv, fold / "eval", eval_extra)
        majority = Counter(r[LABEL].strip() for r in train_rows).most_common(1)[0][0]
        base = sum(r[LABEL].strip() == majority for r in test_rows) / len(test_rows)
        result["folds"].append({"fold": f, "n_test": len(test_rows), "accuracy": metrics["accuracy"],
                                "macro_f1": metrics["macro_f1"], "majority_label": majority, "majority": base,
                                "minutes": (time.perf_counter() - t_fold) / 60,
                                "predicted": dict(Counter(json.loads(line)["prediction"] for line in
                                                          (fold / "eval" / "predictions.jsonl").open()))})
    accs = [x["accuracy"] for x in result["folds"]]
    result["mean"] = statistics.mean(accs)
    result["std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    f1s = [x["macro_f1"] for x in result["folds"]]
    result["f1_mean"], result["f1_std"] = statistics.mean(f1s), statistics.stdev(f1s) if len(f1s) > 1 else 0.0
    result["majority_mean"] = statistics.mean(x["majority"] for x in result["folds"])
    result["seconds"] = time.perf_counter() - t0
    return result


def tweets(data: Path = RAFT) -> list[str]:
    """The tokenizer's training text: every tweet, labelled or not (text only, no labels) + the template's words."""
    texts = [r[TEXT] for r in read_csv(data / "train.csv")[1]]
    if (data / "test_unlabeled.csv").exists():
        texts += [r[TEXT] for r in read_csv(data / "test_unlabeled.csv")[1]]
    return texts + [f"{TEXT} : {LABEL} : {x}" for x in LABELS] * 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-run", default="runs/demo", help="a finished `miniglm demo` run (pretrain/, tokenizer/)")
    ap.add_argument("--model", default=None, help="a pretrained instruct model: a MiniGLM run or a transformers "
                    "folder (zero-shot needs a run; lora/full a transformers folder, exported here from a run)")
    ap.add_argument("--models", default="tiny,demo", help=f"tiny, demo, and with --model: {', '.join(REAL)}")
    ap.add_argument("--instruction", default=INSTRUCTION, help="what every prompt asks (--model kinds)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--finetune-folds", type=int, default=None, help="lora/full: only the first N folds")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per fold")
    ap.add_argument("--no-record", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = ap.parse_args()
    import torch

    from miniglm.runs import is_run

    torch.set_num_threads(1)  # the training runs set this too; evaluation follows it
    models = [m.strip() for m in args.models.split(",")]
    demo = Path(args.demo_run)
    if "demo" in models and not (demo / "pretrain").exists():
        raise SystemExit(f"{demo}: no demo run; make one with `miniglm demo --out {demo}` (a few minutes) "
                         "or pass --demo-run, or --models tiny")
    real = Path(args.model) if args.model else None
    if set(models) & set(REAL) and real is None:
        raise SystemExit(f"{', '.join(REAL)} need --model (a MiniGLM run or a transformers folder)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        real_hf = real
        if real is not None and is_run(real) and set(models) & {"lora", "full"}:
            real_hf = work / "hf"
            cli_ok(["export", "--run", real, "--to", "hf", "--out", real_hf])
        for model in models:
            tiny = tiny_gpt2(work / "tiny", tweets()) if model == "tiny" else None
            folds = args.finetune_folds if model in ("lora", "full") else None
            results.append(cross_validate(model, work, args.folds, args.seed, args.steps, folds, demo=demo, tiny=tiny,
                                          real=real, real_hf=real_hf, instruction=args.instruction))
            print(json.dumps(results[-1]), flush=True)
    k = args.folds
    headers = ["model", *[f"fold {f + 1}" for f in range(k)], "accuracy mean ± std", "macro-F1 mean ± std",
               "majority (train-fold label)", "min/fold"]
    names = {"tiny": "tiny GPT-2 (random init, 2x64, full FT)", "demo": f"demo MiniGLM ({demo}/pretrain, SFT)",
             "zero-shot": f"{real} zero-shot (chat template + instruction)",
             "zero-shot-plain": f"{real} zero-shot (plain template + instruction)",
             "lora": f"{real} LoRA r 8 q/v ({args.steps} steps)", "full": f"{real} full FT ({args.steps} steps)"}
    rows = []
    for r in results:
        accs = [f"{x['accuracy']:.0%}" for x in r["folds"]]
        rows.append([names[r["model"]], *accs, *["–"] * (k - len(accs)), f"**{r['mean']:.1%} ± {r['std']:.1%}**",
                     f"{r['f1_mean']:.3f} ± {r['f1_std']:.3f}", f"{r['majority_mean']:.1%}",
                     f"{statistics.mean(x['minutes'] for x in r['folds']):.1f}"])
    rows.append(["majority baseline", *[f"{x['majority']:.0%}" for x in results[0]["folds"]],
                 *["–"] * (k - len(results[0]["folds"])), f"{results[0]['majority_mean']:.1%}", "",
                 f"overall {results[0]['majority_overall']:.0%}", ""])
    preds = "; ".join(f"{r['model']}: " + ", ".join(json.dumps(x["predicted"]) for x in r["folds"]) for r in results)
    settings = ("tiny: batch 8, lr 1e-3; demo: batch 16, lr 1e-3" if not real else
                f"instruction: \"{args.instruction}\"; lora: lr 1e-3, full: lr 5e-5, batch 8, template hf")
    tuned = set(models) - {"zero-shot", "zero-shot-plain"}
    steps = f"{args.steps} fine-tuning steps per fold" if tuned else "no fine-tuning"
    body = (table(headers, rows) + f"\n\n{results[0]['rows']} labelled rows of raft_twitter_complaints/train.csv, "
            f"stratified {k}-fold CV (seed {args.seed}), "
            f"{steps} "
            f"({settings}), 1 thread; accuracy from "
            f"`miniglm eval classify` (greedy, snapped to the label). Predicted labels per fold: {preds}")
    if args.no_record:
        print(body)
    else:
        record("RAFT twitter_complaints 5-fold CV (bench/raft_cv.py)", body)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"raft_cv: {e}") from None
