"""Decoding speed: 512 new tokens after a 32-token prompt, side by side in one run.

Variants, on the same weights: the engine (KV cache), a no-cache loop that reruns the whole sequence
for every token (the seed's generate), transformers' generate on the exported model, and llama.cpp
on a GGUF export when llama-cpp-python is installed. Models: the demo config (block 544 so 32 + 512
fit) and a ~15M llama-style model (6 layers, width 384, vocab 8192). Also the aggregate tokens/s of a
batch of 8 prompts against batch 1. Weights are random: speed does not depend on them.

--smollm2 RUN adds a real model (an imported SmolLM2-135M-Instruct, fp32) over --smollm2-new tokens: the
engine at batch 1 and 8, transformers' generate and llama.cpp (no no-cache loop: it would take hours), each
as a fraction of the memory bandwidth bound: the weight bytes one decoding step reads (every matrix once,
the tied embedding again as the output layer) x steps/s, against the machine's copy bandwidth
(common.copy_bandwidth). --only-smollm2 skips the small models.

    .venv/bin/python bench/decode.py [--new 512] [--threads 2]
    .venv/bin/python bench/decode.py --profile --new 128    # where a step's time goes, per model
    .venv/bin/python bench/decode.py --smollm2 runs/smollm2 --only-smollm2 --threads 1   # long (~10 min)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, copy_bandwidth, profile_shares, record, table  # noqa: E402

from miniglm import model as model_mod  # noqa: E402
from miniglm.config import load_config  # noqa: E402
from miniglm.engine import Engine, SamplingParams  # noqa: E402
from miniglm.model import MiniGLM, ModelConfig  # noqa: E402


class _Ids:
    """Just enough of a tokenizer for the engine: no text, only ids."""

    pad_id = eot_id = 0
    vocab_size = 1 << 30  # SamplingParams.validate's top_k bound: any model's vocabulary fits
    all_special_ids: frozenset[int] = frozenset()

    def token_bytes(self, i: int) -> bytes:
        return b"x"


REPEATS = 3  # the machine is shared: each figure is the best of a few runs, the variants taking turns


def fastest(timers: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each timer's best tokens/s over REPEATS rounds; the timers take turns within a round, so a busy
    spell on the shared machine slows every variant alike rather than one."""
    best = dict.fromkeys(timers, 0.0)
    for _ in range(REPEATS):
        for name, once in timers.items():
            best[name] = max(best[name], once())
    return best


def engine_timer(model: MiniGLM, prompts: list[list[int]], new: int, step: bool = True,
                 attention: str = "sdpa", **kw) -> Callable[[], float]:
    """A warmed-up engine's generate() as a timer (tokens/s of one run). step=False: every decoding step
    through MiniGLM.forward instead of the engine's DecodeStep; attention: model.DECODE_ATTENTION."""
    eng = Engine(model, _Ids(), **kw)
    if not step:
        eng.decode_step = None
    params = SamplingParams(max_new_tokens=new)
    # warm-up; with compile=True it compiles every length bucket and the batch size
    eng.generate(prompts, params if kw.get("compile") else SamplingParams(max_new_tokens=8))

    def once() -> float:
        model_mod.DECODE_ATTENTION = attention
        try:
            t0 = time.perf_counter()
            outs = eng.generate(prompts, params)
            return sum(len(o.ids) for o in outs) / (time.perf_counter() - t0)
        finally:
            model_mod.DECODE_ATTENTION = "sdpa"
    return once


@torch.inference_mode()
def no_cache_tok_s(model: MiniGLM, prompt: list[int], new: int) -> float:
    best = 0.0
    device = model.embeddings.weight.device
    for _ in range(REPEATS):
        idx = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        for _ in range(new):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        best = max(best, new / (time.perf_counter() - t0))
    return best


def hf_timer(model: MiniGLM, prompt: list[int], new: int) -> Callable[[], float]:
    from transformers import AutoModelForCausalLM

    from miniglm.export import hf_config, to_hf_state_dict

    hf = AutoModelForCausalLM.from_config(hf_config(model.config, 0, 0))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.tie_weights()
    device = model.embeddings.weight.device
    hf.eval().to(device)
    idx = torch.tensor([prompt], device=device)

    @torch.inference_mode()
    def once() -> float:
        t0 = time.perf_counter()
        out = hf.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return (out.shape[1] - len(prompt)) / (time.perf_counter() - t0)
    with torch.inference_mode():
        hf.generate(idx, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return once


def llama_cpp_timers(model: MiniGLM, prompt: list[int], new: int, tmp: Path, threads: int,
                     run: Path | None = None, original: Path | None = None) -> dict[str, Callable[[], float]]:
    """Timers of llama.cpp on GGUF exports of the same weights, per GGUF type ({} when not installed).
    run: the model's run folder (with its tokenizer); else one is made with a BPE trained on a small world.
    original: a GGUF the run was imported from, timed as well ("original")."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    from miniglm.checkpoint import save_checkpoint
    from miniglm.corpus import load_documents
    from miniglm.export import export_gguf
    from miniglm.tokenizer import train_bpe
    from miniglm.world import build_world

    if run is None:
        run = tmp / f"run-{model.config.vocab_size}-{model.config.n_layer}"
        build_world(tmp / "world", characters=200, bios_per_character=3)
        train_bpe(load_documents(tmp / "world" / "corpus.jsonl"), model.config.vocab_size, run / "tokenizer")
        save_checkpoint(run / "ckpt", model, model.config, {"step": 0})

    def run_once(llm, n: int) -> float:
        llm.reset()
        t0, count = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if count == n:
                break
        return count / (time.perf_counter() - t0)

    files = {}
    for outtype in ("f32", "q8_0"):
        export_gguf(run, tmp / f"m-{outtype}.gguf", outtype)
        files[outtype] = tmp / f"m-{outtype}.gguf"
    if original is not None:
        files["original"] = original
    timers = {}
    for kind, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=min(model.config.block_size, 2048),
                              n_threads=threads, n_batch=64, verbose=False)
        run_once(llm, 8)
        timers[kind] = functools.partial(run_once, llm, new)
    return timers


def profile_row(name: str, model: MiniGLM, prompt: list[int], new: int, **kw) -> list[str]:
    """Where a batch-1 decoding step's time goes (torch.profiler over `new` tokens of a warmed-up engine):
    ops dispatched per token, wall microseconds per token, and the shares of the ops' own CPU time in
    matrix products, attention and everything else (norms, RoPE, cache writes, views, sampling)."""
    from torch.profiler import ProfilerActivity, profile

    eng = Engine(model, _Ids(), **kw)
    params = SamplingParams(max_new_tokens=new)
    eng.generate([prompt], SamplingParams(max_new_tokens=8))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        eng.generate([prompt], params)
        wall = time.perf_counter() - t0
    share, largest, ops = profile_shares(prof)
    return [name, f"{ops / new:.0f}", f"{wall / new * 1e6:,.0f}", f"{share['matmul']:.0%}",
            f"{share['attention']:.0%}", f"{share['other']:.0%}", largest]


PROFILE_HEADER = ["model", "ops per token", "us per token (profiled)", "matmul", "attention", "other",
                  "largest others"]


def step_bytes(model: MiniGLM) -> int:
    """Bytes of weights one decoding step reads: every parameter but the embedding table (one row of it is
    read), plus the output layer (a tied embedding is read whole there)."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed" not in name
                and "wte" not in name)
    head = model.lm_head.weight
    return total + (head.numel() * head.element_size() if model.config.tie_embeddings else 0)


COMPILED_HEADER = ["b=1 int8 --compile", "--compile/llama.cpp F32", "int8 --compile/llama.cpp Q8_0"]


def compiled_cells(t: dict[str, float], cell: Callable[..., str], int8_bytes: float) -> list[str]:
    """The compiled variants' columns (COMPILED_HEADER): "-" where a variant was not run."""
    return [cell(t["int8c"], 1, int8_bytes) if "int8c" in t else "-",
            f"**{t['compile'] / t['f32']:.2f}x**" if "compile" in t and "f32" in t else "-",
            f"**{t['int8c'] / t['q8_0']:.2f}x**" if "int8c" in t and "q8_0" in t else "-"]


def smollm2_row(run: Path, new: int, threads: int, tmp: Path, device: str = "cpu", compile: bool = False) -> str:
    """Engine b=1 / b=8 / int8, transformers generate, llama.cpp F32 / Q8_0 on the real model; tok/s and the
    fraction of the bandwidth bound."""
    from miniglm.runs import load_model

    model = load_model(run).eval().to(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, model.config.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
    bandwidth = copy_bandwidth() * 1e9 if device == "cpu" else None
    weights = step_bytes(model)

    def cell(tok_s: float, batch: int = 1, bytes_per_step: float = weights) -> str:
        share = f" ({bytes_per_step * tok_s / batch / bandwidth:.0%})" if bandwidth else ""
        return f"{tok_s:,.1f}{share}"

    state = json.loads((run / "ckpt" / "state.json").read_text())
    original = Path(state["imported_from"]) if Path(state.get("imported_from", "")).is_file() else None
    timers = {"eng1": engine_timer(model, prompts[:1], new, device=device),
              "eng8": engine_timer(model, prompts, new, device=device),
              "hf": hf_timer(model, prompts[0], new)}
    if compile:
        timers["compile"] = engine_timer(model, prompts[:1], new, device=device, compile=True)
    if device == "cpu":
        timers["int8"] = engine_timer(model, prompts[:1], new, int8=True)
        if compile:
            timers["int8c"] = engine_timer(model, prompts[:1], new, int8=True, compile=True)
        timers.update(llama_cpp_timers(model, prompts[0], new, tmp, threads, run=run, original=original))
    speeds = fastest(timers)
    eng1, eng8, hf, int8, cpp = speeds["eng1"], speeds["eng8"], speeds["hf"], speeds.get("int8"), speeds
    q8_bytes = weights * 34 / 128  # Q8_0: 34 bytes per 32 weights
    q41_bytes = weights * 20 / 128  # Q4_1: 20 bytes per 32 weights (its few Q8_0/F32 tensors not counted)
    cols = [cell(eng1), cell(eng8, 8), f"{eng8 / eng1:.1f}x", cell(int8, 1, weights / 4) if int8 else "-", cell(hf),
            *([cell(cpp["f32"]), f"**{eng1 / cpp['f32']:.2f}x**", cell(cpp["q8_0"], 1, q8_bytes),
               f"**{int8 / cpp['q8_0']:.2f}x**"] if "f32" in cpp else ["-"] * 4),
            cell(cpp["original"], 1, q41_bytes) if "original" in cpp else "-",
            cell(speeds["compile"]) if "compile" in speeds else "-", *compiled_cells(speeds, cell, weights / 4)]
    body = table(["model", "params", "weight MB read per step", "engine b=1 tok/s", "engine b=8 tok/s (aggregate)",
                  "b8/b1", "engine b=1 int8", "transformers generate tok/s", "llama.cpp F32 tok/s",
                  "engine/llama.cpp F32", "llama.cpp Q8_0 tok/s", "engine int8/llama.cpp Q8_0",
                  "llama.cpp original Q4_1 tok/s", "b=1 --compile", *COMPILED_HEADER],
                 [[f"SmolLM2-135M-Instruct ({run})", f"{model.num_params() / 1e6:.1f}M", f"{weights / 2**20:,.0f}",
                   *cols]])
    body += (f"\n\n{new} new tokens after a 32-token prompt, greedy, fp32 unless int8, {threads} thread(s), {device}; "
             f"every figure the best of {REPEATS} runs")
    if bandwidth:
        body += ("; in brackets the fraction of the memory bandwidth bound: weight bytes read per step x steps/s "
                 "(tok/s / batch) against the copy bandwidth measured here, "
                 f"{bandwidth / 1e9:.2f} GB/s (read + write of a 256 MB tensor, best of 5; KV cache reads not counted)")
    return body


def int8_agreement(run: Path, positions: int = 512) -> str:
    """Greedy tokens of the int8 engine against fp32's on a trained run (random weights tie too often to
    say anything): texts from the run's validation documents as prompts, each continued to the block size
    until `positions` new tokens; free-running (int8 decodes its own tokens) and teacher-forced (int8's
    argmax after fp32's tokens) agreement."""
    from miniglm.corpus import load_documents
    from miniglm.runs import load_model, load_run_tokenizer

    model = load_model(run).eval()
    tok = load_run_tokenizer(run, model.config.vocab_size)
    fp32, int8 = Engine(model, tok), Engine(model, tok, int8=True)
    docs = load_documents(run.parent / "corpus" / "val.jsonl")
    block = model.config.block_size
    same = forced = total = 0
    for doc in docs:
        prompt = tok.encode(doc)[:16]
        params = SamplingParams(max_new_tokens=min(block - len(prompt), positions - total))
        want = fp32.generate([prompt], params)[0].ids
        got = int8.generate([prompt], params)[0].ids
        same += sum(a == b for a, b in zip(got, want, strict=False))
        with torch.inference_mode():
            logits = int8.model(torch.tensor([prompt + want[:-1]]))[0][0, len(prompt) - 1:]
        forced += int((logits.argmax(-1) == torch.tensor(want)).sum())
        total += len(want)
        if total >= positions:
            break
    return (f"int8 greedy tokens equal to fp32's on {run}: {same / total:.1%} of {total} positions free-running, "
            f"{forced / total:.1%} teacher-forced (prompts: the first 16 tokens of {run.parent / 'corpus'}'s "
            "validation documents)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp and int8 rows are CPU only)")
    ap.add_argument("--no-cache-tokens", type=int, default=0, help="time the no-cache loop over fewer tokens (0: all)")
    ap.add_argument("--smollm2", default=None, help="an imported SmolLM2-135M-Instruct run: adds its row")
    ap.add_argument("--smollm2-new", type=int, default=256)
    ap.add_argument("--only-smollm2", action="store_true", help="skip the small random-weight models")
    ap.add_argument("--smollm2-shaped", action="store_true", help="add a random-weight model of SmolLM2-135M's "
                    "shape (30 x 576, 9/3 heads, vocab 49152) beside the small ones: for a machine without the GGUF")
    ap.add_argument("--compile", action="store_true", help="add the engine with a compiled decoding step "
                    "(compiles for minutes on 2 cores)")
    ap.add_argument("--profile", action="store_true", help="only where a batch-1 step's time goes (torch.profiler): "
                    "fp32 and int8, per model")
    ap.add_argument("--agreement", default=None, help="a trained MiniGLM run (e.g. runs/demo/pretrain): int8 "
                    "against fp32 greedy tokens over 512 positions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = args.device == "cpu"
    agreement = int8_agreement(Path(args.agreement)) if args.agreement else None
    if args.smollm2:
        with tempfile.TemporaryDirectory() as tmp:
            body = smollm2_row(Path(args.smollm2), args.smollm2_new, args.threads, Path(tmp), args.device,
                               args.compile)
        record(f"Decoding speed, SmolLM2-135M-Instruct (bench/decode.py --smollm2, {args.device})", body)
        if args.only_smollm2:
            return
    demo = load_config(ROOT / "configs" / "demo.toml").model
    models = {
        "demo": ModelConfig(**{**demo.to_dict(), "block_size": 32 + args.new}),
        "15M llama": ModelConfig(style="llama", vocab_size=8192, block_size=32 + args.new, n_layer=6, n_head=6,
                                 n_embd=384),
    }
    if args.smollm2_shaped:
        models["SmolLM2-shaped"] = ModelConfig(style="llama", vocab_size=49152, block_size=32 + args.new, n_layer=30,
                                               n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                                               rope_theta=100000.0)
    if args.profile:
        rows = []
        for name, cfg in models.items():
            torch.manual_seed(0)
            model = MiniGLM(cfg).eval()
            prompt = torch.randint(1, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
            rows += [profile_row(name, model, prompt, args.new), profile_row(f"{name} int8", model, prompt, args.new,
                                                                            int8=True)]
            print(" | ".join(rows[-2]), "\n" + " | ".join(rows[-1]), flush=True)
        record(f"Decoding profile (bench/decode.py --profile, {args.threads} threads)",
               table(PROFILE_HEADER, rows) + f"\n\nengine batch 1, {args.new} new tokens after 32, greedy; shares "
               "of the aten ops' own CPU time (torch.profiler; it adds its own cost per op, so the microseconds "
               "run above the unprofiled step's)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="miniglm-decode-"))
    bandwidth = copy_bandwidth() * 1e9 if cpu else None
    rows = []
    for name, cfg in models.items():
        torch.manual_seed(0)
        model = MiniGLM(cfg).eval().to(args.device)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
        weights = step_bytes(model)

        def cell(tok_s: float, batch: int = 1, bytes_per_step: float = weights) -> str:
            share = f" ({bytes_per_step * tok_s / batch / bandwidth:.0%})" if bandwidth else ""
            return f"{tok_s:,.0f}{share}"

        dev = {"device": args.device}
        timers = {"eng1": engine_timer(model, prompts[:1], args.new, **dev),
                  "eng8": engine_timer(model, prompts, args.new, **dev),
                  "forward": engine_timer(model, prompts[:1], args.new, step=False, **dev),
                  "matmul": engine_timer(model, prompts[:1], args.new, attention="matmul", **dev),
                  "linear": engine_timer(model, prompts[:1], args.new, transposed=False, **dev),
                  "hf": hf_timer(model, prompts[0], args.new)}
        if args.compile:
            timers["compile"] = engine_timer(model, prompts[:1], args.new, compile=True, **dev)
        if not cpu:  # CUDA replays each step as a graph by default: the step launched op by op beside it
            timers["nographs"] = engine_timer(model, prompts[:1], args.new, graphs=False, **dev)
        if cpu:
            timers["int8"] = engine_timer(model, prompts[:1], args.new, int8=True)
            if args.compile:
                timers["int8c"] = engine_timer(model, prompts[:1], args.new, int8=True, compile=True)
            timers.update(llama_cpp_timers(model, prompts[0], args.new, tmp, args.threads))
        t = fastest(timers)
        eng1, eng8 = t["eng1"], t["eng8"]
        nocache = no_cache_tok_s(model, prompts[0], args.no_cache_tokens or args.new)
        int8_bytes = weights / 4  # int8 weights (their per-channel scales are a few KB)
        q8_bytes = weights * 34 / 128  # Q8_0: 34 bytes per 32 weights
        rows.append([name, f"{model.num_params() / 1e6:.1f}M", cell(eng1), cell(t["forward"]), cell(t["linear"]),
                     cell(t["matmul"]), cell(t["nographs"]) if "nographs" in t else "-",
                     cell(t["compile"]) if "compile" in t else "-",
                     cell(t["int8"], 1, int8_bytes) if "int8" in t else "-",
                     cell(eng8, 8), f"{eng8 / eng1:.1f}x", f"{nocache:,.0f}", f"{eng1 / nocache:.1f}x",
                     f"{t['hf']:,.0f}", f"{eng1 / t['hf']:.2f}x",
                     *([cell(t["f32"]), f"**{eng1 / t['f32']:.2f}x**", cell(t["q8_0"], 1, q8_bytes),
                        f"**{t['int8'] / t['q8_0']:.2f}x**"] if "f32" in t else ["-"] * 4),
                     *compiled_cells(t, cell, int8_bytes)])
        print(" | ".join(rows[-1]), flush=True)
    body = table(["model", "params", "engine b=1 tok/s", "b=1, steps through MiniGLM.forward",
                  "b=1, (out, in) layout alone", "b=1, matmul decode attention", "b=1 without CUDA graphs",
                  "b=1 --compile", "engine b=1 int8",
                  "engine b=8 tok/s (aggregate)", "b8/b1", "no-cache tok/s", "engine/no-cache",
                  "transformers generate tok/s", "engine/transformers", "llama.cpp F32 tok/s",
                  "engine/llama.cpp F32", "llama.cpp Q8_0 tok/s", "engine int8/llama.cpp Q8_0", *COMPILED_HEADER],
                 rows)
    body += (f"\n\n{args.new} new tokens after a 32-token prompt, greedy, fp32 unless int8, {args.threads} threads, "
             f"{args.device}; the no-cache loop timed over {args.no_cache_tokens or args.new} tokens; int8 = int8 "
             "weights with per-channel scales, activations quantized per row on the fly (engine.Int8Linear; not "
             "bit-exact with fp32); every figure the best of "
             f"{REPEATS} runs")
    if bandwidth:
        body += (f"; in brackets the fraction of the memory bandwidth bound: weight bytes read per step x steps/s "
                 f"against the copy bandwidth measured here, {bandwidth / 1e9:.2f} GB/s (read + write of a 256 MB "
                 "tensor; KV cache reads not counted; these models' weights fit in the 48 MB L3 partly or "
                 "wholly, so the fraction can pass 100%)")
    if agreement:
        body += f". {agreement}"
    record(f"Decoding speed (bench/decode.py, {args.device})", body)


if __name__ == "__main__":
    main()
