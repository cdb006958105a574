"""The demo's quality/time trade-off: run `miniglm demo` with a few settings, one after another, and
tabulate held-out and training-character exact match / ROUGE-L against wall time.

    .venv/bin/python bench/demo_sweep.py                      # the variants below
    .venv/bin/python bench/demo_sweep.py --only default big   # some of them

Each variant is a full demo run (minutes); results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, table  # noqa: E402

from miniglm.demo import DemoOptions, run_demo  # noqa: E402

# name -> (DemoOptions fields, pretrain overrides, sft overrides) over configs/demo*.toml
VARIANTS: dict[str, tuple[dict, list[str], list[str]]] = {
    "6 bios, 600 steps (the first demo)": ({"bios": 6, "mix_qa": False}, ["max_steps=600"], []),
    "6 bios, 3000 steps": ({"bios": 6, "mix_qa": False}, ["max_steps=3000"], []),
    "24 bios, 3000 steps": ({"bios": 24, "mix_qa": False}, ["max_steps=3000"], []),
    "24 bios, Q&A mixed, 1500 steps": ({"bios": 24, "mix_qa": True}, ["max_steps=1500"], []),
    "24 bios, Q&A mixed, 3000 steps (default)": ({"bios": 24, "mix_qa": True}, ["max_steps=3000"], []),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--keep", default=None, help="keep each variant's run folder under this folder")
    args = ap.parse_args()
    names = args.only or list(VARIANTS)
    rows = []
    for name in names:
        fields, pre, sft = VARIANTS[name]
        with tempfile.TemporaryDirectory(prefix="miniglm-demo-") as tmp:
            out = Path(args.keep) / name.replace(" ", "_").replace(",", "") if args.keep else Path(tmp) / "demo"
            opts = DemoOptions(out=str(out), questions=args.questions, pretrain_overrides=pre,
                               sft_overrides=sft, **fields)
            r = run_demo(opts)
        held, train = r["eval"]["sft_test"], r["eval"]["sft_train"]
        rows.append([name, f"{opts.characters} x {opts.bios}", f"{r['pretrain']['params'] / 1e6:.1f}M",
                     r["pretrain"]["steps"], f"{r['pretrain']['val_loss']:.3f}",
                     f"{held['exact_match']:.1%}", f"{held['rouge-l']:.1f}",
                     f"{train['exact_match']:.1%}", f"{train['rouge-l']:.1f}",
                     f"{held['baseline']['exact_match']:.1%}", f"{r['seconds'] / 60:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    body = table(["variant", "characters x bios", "params", "pretrain steps", "pretrain val loss",
                  "held-out EM", "held-out ROUGE-L", "training-char EM", "training-char ROUGE-L",
                  "baseline EM (most frequent per fact)", "demo minutes"], rows)
    body += f"\n\n{args.questions} questions per split, greedy; the whole `miniglm demo` timed, 2 threads"
    record("Demo quality vs time (bench/demo_sweep.py)", body)


if __name__ == "__main__":
    main()
