"""The demo's levers: run `miniglm demo` with a few settings and tabulate held-out exact match (all
2,250 held-out questions, greedy), the pretraining knowledge probe's curve, and time.

    .venv/bin/python bench/demo_sweep.py --only default tokenizer-gpt2     # some variants, in turn
    .venv/bin/python bench/demo_sweep.py --threads 1 --log sweep.jsonl      # two at a time on 2 cores
    .venv/bin/python bench/demo_sweep.py --table sweep.jsonl                # the table of a log

Each variant is a whole demo (minutes). Every result is appended to the --log file as it ends; the
table goes to bench/RESULTS.md. Times compare only within runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, table  # noqa: E402

from miniglm.demo import DemoOptions, run_demo  # noqa: E402
from miniglm.runs import read_metrics  # noqa: E402

# name -> (DemoOptions fields, pretraining overrides, SFT overrides) over configs/demo*.toml
VARIANTS: dict[str, tuple[dict, list[str], list[str]]] = {
    "default": ({}, [], []),
    "tokenizer-gpt2": ({"han_chars": False}, [], []),  # GPT-2's split: names fused with their neighbours
    "seed-2": ({"seed": 2}, [], []),
    "steps-half": ({}, ["max_steps=1500"], []),
    "pretrain-lr-4e-3": ({}, ["lr=4e-3", "min_lr=4e-4"], []),
    "sft-lr-1e-3": ({}, [], ["lr=1e-3", "min_lr=1e-4"]),  # the SFT before: overwrites held-out knowledge
    "sft-lr-3e-4-100-steps": ({}, [], ["lr=3e-4", "min_lr=3e-5", "max_steps=100"]),
    "sft-lora-r8-lr-1e-3": ({}, [], ["lora_r=8", "lr=1e-3", "min_lr=1e-4"]),
    "no-mixed-qa": ({"mix_qa": False}, [], []),
}


def run_variant(name: str, fields: dict, pre: list[str], sft: list[str], threads: int, seed: int | None,
                keep: str | None) -> dict:
    fields = {**fields, **({"seed": seed} if seed is not None else {})}
    with tempfile.TemporaryDirectory(prefix="miniglm-demo-") as tmp:
        out = Path(keep) / name if keep else Path(tmp) / "demo"
        opts = DemoOptions(out=str(out), questions=2250, overrides=[f"threads={threads}"] if threads else [],
                           pretrain_overrides=pre, sft_overrides=sft, **fields)
        r = run_demo(opts, log=lambda *a: None)
        held = json.loads((out / "sft" / "eval" / "metrics.json").read_text())
        probes = [(m["step"], round(m["probe_heldout_em"], 3)) for m in read_metrics(out / "pretrain")
                  if "probe_heldout_em" in m]
    return {"name": name, "seed": opts.seed, "han_chars": opts.han_chars, "vocab": r["tokenizer"]["vocab_size"],
            "pre": pre, "sft": sft, "threads": threads, "steps": r["pretrain"]["steps"],
            "params": r["pretrain"]["params"], "tok_s": round(r["pretrain"]["tok_per_s"]),
            "pre_s": round(r["pretrain"]["seconds"]), "total_s": round(r["seconds"]),
            "held": r["eval"]["sft_test"]["exact_match"], "train": r["eval"]["sft_train"]["exact_match"],
            "per_fact": {k: round(v["exact_match"], 3) for k, v in held["groups"].items()}, "probes": probes}


def result_table(results: list[dict]) -> str:
    facts = list(results[0]["per_fact"])
    rows = [[r["name"], r["seed"], "han-chars" if r["han_chars"] else "gpt2 split", r["vocab"],
             " ".join(r["pre"] + r["sft"]) or "-", r["steps"], f"{r['tok_s']:,}", f"{r['held']:.1%}",
             f"{r['probes'][-1][1]:.1%}" if r["probes"] else "-", f"{r['train']:.1%}",
             *(f"{r['per_fact'][f]:.0%}" for f in facts), f"{r['pre_s'] / 60:.1f}", f"{r['total_s'] / 60:.1f}"]
            for r in results]
    return table(["variant", "world seed", "tokenizer", "vocab", "overrides", "pretrain steps", "tok/s",
                  "held-out EM (after SFT)", "probe EM (pretrained, no SFT)", "training-char EM", *facts,
                  "pretrain min", "demo min"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variant names (default: all)")
    ap.add_argument("--seed", type=int, default=None, help="world seed for every variant (default: the demo's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--keep", default=None, help="keep each variant's run folder under this folder")
    ap.add_argument("--log", default=None, help="append each result to this JSON Lines file")
    ap.add_argument("--table", default=None, help="only print and record the table of a --log file")
    args = ap.parse_args()
    if args.table:
        results = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
    else:
        results = []
        for name in args.only or list(VARIANTS):
            results.append(run_variant(name, *VARIANTS[name], args.threads, args.seed, args.keep))
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
            if args.log:
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(results[-1], ensure_ascii=False) + "\n")
    body = result_table(results)
    body += ("\n\nexact match on all 2,250 held-out questions (greedy); probe: the pretrained model asked "
             "问：…\\n答： at the last pretraining step (500 held-out questions); times are per run as run "
             "(side by side runs share the 2 cores)")
    record("Demo levers (bench/demo_sweep.py)", body)


if __name__ == "__main__":
    main()
