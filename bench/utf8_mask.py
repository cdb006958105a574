"""The sampler's UTF-8 mask (engine.TextMask): decoding speed with it and without it, side by side in one run,
and on a trained run, how many of 1,000 sampled answers hold U+FFFD or a C0 control character either way.

Speed: random-weight models (speed does not depend on the weights), sampling at temperature 1.0, 256 new
tokens after a 32-token prompt, batch 1 and 8; the variants take turns, each figure the best of 7. Vocabularies:
the demo's tokenizer (a Han-split BPE; --tokenizer, else one trained here on the embedded world) and a
100,277-id stand-in of cl100k_base's size (the mask's cost is one gather and one masked_fill over the vocabulary,
so its size is what matters, not which bytes the tokens hold).

Validity (--run RUN, e.g. a demo's sft folder): 1,000 answers at temperature 1.0 (50 out-of-domain prompts x
20 seeds), the run's chat template, 64 new tokens at most, with the mask and without it.

    .venv/bin/python bench/utf8_mask.py [--run runs/demo/sft] [--tokenizer runs/demo/tokenizer] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record, table  # noqa: E402

from miniglm.config import load_config  # noqa: E402
from miniglm.engine import OWE2, Engine, SamplingParams, mask_for, sample_next  # noqa: E402
from miniglm.model import MiniGLM, ModelConfig  # noqa: E402
from miniglm.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

REPEATS = 7
OUT_OF_DOMAIN = [
    "你好", "今天天气怎么样？", "请写一首关于秋天的诗。", "What is the capital of France?", "Explain recursion.",
    "🙂🙂🙂", "def fib(n):", "SELECT * FROM users;", "1234567890", "请翻译：I love you.", "龘靐齉爩", "鱻麤羴猋",
    "こんにちは", "안녕하세요", "Привет, как дела?", "مرحبا", "naïve café résumé", "∑∫∂√∞≈≠", "【公告】",
    "#include <stdio.h>", "火星上有生命吗？", "推荐几本科幻小说", "how to bake bread", "Ω≈ç√∫˜µ≤≥÷", "量子计算是什么",
    "给我讲个笑话", "<html><body>", "ｆｕｌｌ　ｗｉｄｔｈ", "𠀀𠀁𠀂", "股票会涨吗", "Write a haiku about the sea.",
    "C'est la vie", "東京タワー", "北京到上海多远", "Tell me about GPUs.", "ℵ₀ ∈ ℕ", "红楼梦的作者是谁",
    "¿Qué hora es?", "\t缩进\t", "换行\n测试", "The quick brown fox", "圆周率是多少", "蛋白质有什么作用",
    "Hello 世界", "░▒▓█", "谁是最强的剑客？", "武功秘籍在哪里", "天气预报", "你是谁？", "再见",
]


class StandIn(Tokenizer):
    """A vocabulary of cl100k_base's size for the speed table: every byte, then slices of mixed text."""

    def __init__(self, size: int = 100_277):
        rng = random.Random(0)
        text = ("天下大势，分久必合，合久必分。The quick brown fox jumps over the lazy dog. 🙂 é ñ " * 4).encode()
        pieces = [bytes([b]) for b in range(256)]
        while len(pieces) < size - 1:
            start = rng.randrange(len(text))
            pieces.append(text[start:start + rng.randint(2, 12)])
        self.pieces = [*pieces, b"<|endoftext|>"]
        self.name, self.vocab_size = "cl100k-sized stand-in", size
        self.eot_id = self.pad_id = size - 1
        self.special_ids = {"<|endoftext|>": size - 1}
        self.all_special_ids = frozenset([size - 1])

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]


def demo_tokenizer(path: str | None) -> Tokenizer:
    if path:
        return load_tokenizer(path)
    from miniglm.corpus import load_documents
    from miniglm.tokenizer import train_bpe
    from miniglm.world import build_world

    tmp = Path(tempfile.mkdtemp(prefix="miniglm-utf8-"))
    build_world(tmp / "world", characters=200, bios_per_character=8, seed=1337)
    return train_bpe(load_documents(tmp / "world" / "corpus.jsonl"), 4096, tmp / "tok", han_chars=True)


def sampler_us(tok: Tokenizer, batch: int, masked: bool, mixed: bool) -> float:
    """One sample_next call on (batch, vocabulary) logits, with the mask's gather and state lookups or without,
    in microseconds (best of 20 rounds of 50 calls): the mask's own cost, apart from the machine's noise."""
    mask, g = mask_for(tok, tok.vocab_size), torch.Generator().manual_seed(0)
    logits = torch.randn(batch, tok.vocab_size, generator=g)
    states = [OWE2 if mixed and i % 2 else 0 for i in range(batch)]
    params = SamplingParams(temperature=1.0)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(50):
            rows = mask.rows(states, logits) if masked else None
            picked = sample_next(logits, params, None, g, mask=rows).tolist()
            if masked:
                states = [mask.after(s, t) for s, t in zip(states, picked, strict=True)]  # Row.push's lookup
        best = min(best, (time.perf_counter() - t0) / 50)
    return best * 1e6


def speed_rows(tokenizers: dict[str, Tokenizer], new: int) -> list[list[str]]:
    demo = load_config(ROOT / "configs" / "demo.toml").model
    rows = []
    for name, tok in tokenizers.items():
        cfg = ModelConfig(**{**demo.to_dict(), "vocab_size": tok.vocab_size, "block_size": 32 + new})
        torch.manual_seed(0)
        model = MiniGLM(cfg).eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, 256, (32,), generator=g).tolist() for _ in range(8)]
        engines = {"off": Engine(model, tok, valid_text=False), "on": Engine(model, tok)}
        params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
        for batch in (1, 8):
            best = dict.fromkeys(engines, 0.0)
            for eng in engines.values():  # warm-up
                eng.generate(prompts[:batch], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
            for _ in range(REPEATS):  # the variants take turns: a busy spell slows both alike
                for key, eng in engines.items():
                    t0 = time.perf_counter()
                    outs = eng.generate(prompts[:batch], params)
                    best[key] = max(best[key], sum(len(o.ids) for o in outs) / (time.perf_counter() - t0))
            off_us, on_us = sampler_us(tok, batch, False, False), sampler_us(tok, batch, True, batch > 1)
            rows.append([name, f"{tok.vocab_size:,}", f"{model.num_params() / 1e6:.1f}M", str(batch),
                         f"{best['off']:,.0f}", f"{best['on']:,.0f}", f"{best['on'] / best['off']:.2f}x",
                         f"{off_us:.0f}", f"{on_us:.0f}", f"{(on_us - off_us) * best['on'] / batch / 1e4:.1f}%"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def validity_rows(run_path: str) -> list[list[str]]:
    from miniglm.chat import generate_texts, load_run

    run = load_run(run_path, device="cpu")
    mask = run.engine.text_mask
    rows = []
    for label, on in (("without the mask", False), ("with the mask", True)):
        run.engine.text_mask = mask if on else None  # Engine's rows take the mask from here
        answers = []
        t0 = time.perf_counter()
        for seed in range(20):
            params = SamplingParams(max_new_tokens=64, temperature=1.0, seed=seed, fit_new_tokens=True)
            answers += [r["output"] for r in generate_texts(run, OUT_OF_DOMAIN, params, batch_size=50)]
        fffd = sum(a.count("\ufffd") for a in answers)
        c0 = sum(sum(ord(c) < 32 and c not in "\t\n\r" for c in a) for a in answers)
        rows.append([label, f"{len(answers):,}", str(sum("\ufffd" in a for a in answers)), str(fffd),
                     str(sum(any(ord(c) < 32 and c not in "\t\n\r" for c in a) for a in answers)), str(c0),
                     f"{sum(len(a) for a in answers):,}", f"{time.perf_counter() - t0:.0f} s"])
        print(" | ".join(rows[-1]), flush=True)
    run.engine.text_mask = mask
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a trained run (a demo's sft folder): the 1,000-answer count")
    ap.add_argument("--tokenizer", default=None, help="the demo's tokenizer folder (default: train one here)")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizers = {"demo (Han-split BPE)": demo_tokenizer(args.tokenizer), "cl100k-sized stand-in": StandIn()}
    body = table(["vocabulary", "ids", "model", "batch", "tok/s without the mask", "tok/s with the mask",
                  "with/without", "sample_next us without", "with (gather, add, state)",
                  "mask's share of a step"], speed_rows(tokenizers, args.new))
    body += (f"\n\nDemo-config model (random weights, llama, 4 x 128, the vocabulary's width), {args.new} new tokens "
             f"after 32, temperature 1.0, seeded, fp32, CPU, {args.threads} threads; aggregate tok/s, best of "
             f"{REPEATS} turns each. The sampler columns time sample_next alone on random logits (batch 8: half "
             "the rows inside a character, so the gather runs; batch 1 and rows all in one state take a view), "
             "best of 20 x 50 calls; the share is the extra microseconds against the masked step's time")
    if args.run:
        body += "\n\n" + table(["sampling", "answers", "answers with U+FFFD", "U+FFFD", "answers with C0",
                                "C0 characters", "characters", "time"], validity_rows(args.run))
        body += (f"\n\n{args.run}: 50 out-of-domain prompts (other languages, code, emoji, rare characters) x 20 "
                 "seeds, its chat template, temperature 1.0, at most 64 new tokens; C0: controls but \\t \\n \\r")
    record("UTF-8 mask: decoding speed and valid text (bench/utf8_mask.py)", body)


if __name__ == "__main__":
    main()
