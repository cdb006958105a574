"""Decoding a Hugging Face model through HFEngine: a batch on the calling thread against a stream from a worker.

HFEngine.generate runs transformers' generate() on the calling thread; HFEngine.stream runs it in a worker
thread (its caller reads each step as it comes). Once the main thread has run torch ops (loading the model
does), a second thread's ops go through a second OpenMP thread pool, and on a 2-core machine every parallel
op then waits on a kernel wake-up. Side by side in interleaved rounds, on a random-weight GPT-2 of the
given shape (greedy, no stop token): HFEngine.generate at batch 1 and 4, HFEngine.stream at batch 1, and
transformers' generate() called directly on the main thread.

    .venv/bin/python bench/hf_decode.py [--new 96] [--layers 6] [--width 512] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, table  # noqa: E402
from decode import _Ids  # noqa: E402

from miniglm.engine import SamplingParams  # noqa: E402
from miniglm.hf import FAMILIES, HFCausalLM  # noqa: E402
from miniglm.hf_engine import HFEngine  # noqa: E402


class _Tokenizer(_Ids):
    pad_id, eot_id = 0, 1

    def token_id(self, token: str) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=args.width, n_layer=args.layers, n_head=8, vocab_size=8000,
                                    n_positions=512, eos_token_id=1, bos_token_id=1)).eval()
    engine = HFEngine(HFCausalLM(hf, FAMILIES["gpt2"]), _Tokenizer())
    prompts = [torch.randint(2, 8000, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    params = SamplingParams(max_new_tokens=args.new, stop_ids=[])

    def batch(n: int) -> float:
        t0 = time.perf_counter()
        return sum(len(c.ids) for c in engine.generate(prompts[:n], params)) / (time.perf_counter() - t0)

    def stream() -> float:
        t0 = time.perf_counter()
        for _ in engine.stream(prompts[0], params):
            pass
        return args.new / (time.perf_counter() - t0)

    @torch.inference_mode()
    def direct() -> float:
        idx = torch.tensor(prompts[:1])
        t0 = time.perf_counter()
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.new,
                          min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        return (out.shape[1] - idx.shape[1]) / (time.perf_counter() - t0)

    timers = {"HFEngine.generate b=1 (this thread)": lambda: batch(1), "HFEngine.generate b=4": lambda: batch(4),
              "HFEngine.stream b=1 (worker thread)": stream, "transformers generate() b=1, main thread": direct}
    batch(1)
    best = dict.fromkeys(timers, 0.0)
    for _ in range(args.rounds):  # interleaved: a busy spell slows every variant alike
        for name, once in timers.items():
            best[name] = max(best[name], once())
    base = best["HFEngine.generate b=1 (this thread)"]
    rows = [[name, f"{tok_s:,.0f}", f"{tok_s / base:.2f}x"] for name, tok_s in best.items()]
    print("\n".join(" | ".join(r) for r in rows))
    record("HF decoding: a batch on the calling thread vs a stream from a worker thread (bench/hf_decode.py)",
           table(["variant", "tok/s", "vs generate b=1"], rows)
           + f"\n\nrandom GPT-2 {args.layers} x {args.width}, vocab 8000, {args.new} new tokens after 16, greedy, "
             f"fp32, torch threads {torch.get_num_threads()}; best of {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
