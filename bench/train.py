"""Training throughput: tokens/s and achieved GFLOP/s against the machine's fp32 matmul ceiling.

Side by side in one run: the demo config, a 13.8M gpt2-style config (nanoGPT's reference size:
6 layers, width 384, vocab 8192, batch 16 x 256) and a ~25M llama-style config, eager and with
torch.compile. FLOPs per token follow nanoGPT's estimate: 6*N + 12*layers*heads*head_dim*T.
On CUDA (--device cuda) it also reports MFU of a GPT-2-small config against the bf16 peak.

    .venv/bin/python bench/train.py [--steps 20] [--device cpu|cuda] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record, table  # noqa: E402

from miniglm.config import load_config  # noqa: E402
from miniglm.model import MiniGLM, ModelConfig  # noqa: E402
from miniglm.train import make_optimizer  # noqa: E402

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def matmul_ceiling(device: str, dtype=torch.float32, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """The best of several timed trials of a large matmul: on a shared machine the best is the ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_token(model: MiniGLM, T: int) -> float:
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T


def measure(config: ModelConfig, batch: int, steps: int, device: str, compile: bool) -> dict:
    torch.manual_seed(0)
    model = MiniGLM(config).to(device)
    cfg = load_config(None)
    opt = make_optimizer(model, cfg, "cuda" if device.startswith("cuda") else "cpu")
    step_model = torch.compile(model) if compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    T = config.block_size
    x = torch.randint(0, config.vocab_size, (batch, T), device=device)
    y = torch.randint(0, config.vocab_size, (batch, T), device=device)

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    tok_s = batch * T * steps / dt
    return {"params": model.num_params(), "tok_s": tok_s, "flops": flops_per_token(model, T) * tok_s, "warm": warm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = args.device
    demo = load_config(ROOT / "configs" / "demo.toml")
    configs = [
        ("demo (llama)", demo.model, demo.batch_size),
        ("13.8M gpt2 (nanoGPT size)", ModelConfig(style="gpt2", vocab_size=8192, block_size=256, n_layer=6,
                                                  n_head=6, n_embd=384), 16),
        ("13.8M llama", ModelConfig(style="llama", vocab_size=8192, block_size=256, n_layer=6, n_head=6,
                                    n_embd=384), 16),
        ("~25M llama", ModelConfig(style="llama", vocab_size=8192, block_size=256, n_layer=8, n_head=7,
                                   n_embd=448), 16),
    ]
    if device.startswith("cuda"):
        configs.append(("GPT-2 small 124M", ModelConfig(style="gpt2", vocab_size=50304, block_size=1024,
                                                        n_layer=12, n_head=12, n_embd=768), 16))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    ceiling = matmul_ceiling(device, dtype)
    results = []
    for name, cfg, batch in configs:
        for compile in [False] + ([] if args.no_compile else [True]):
            r = measure(cfg, batch, args.steps, device, compile)
            results.append((name, cfg, batch, compile, r))
            print(name, "compile" if compile else "eager", f"{r['tok_s']:,.0f} tok/s", flush=True)
    ceiling = max(ceiling, matmul_ceiling(device, dtype))  # the best of before and after the runs
    peak = None
    if device.startswith("cuda"):
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
    rows = []
    for name, cfg, batch, compile, r in results:
        row = [name, "compile" if compile else "eager", f"{r['params'] / 1e6:.1f}M", f"{batch}x{cfg.block_size}",
               f"{r['tok_s']:,.0f}", f"{r['flops'] / 1e9:.1f}", f"{100 * r['flops'] / ceiling:.0f}%"]
        if device.startswith("cuda"):
            row.append(f"{100 * r['flops'] / peak:.1f}%" if peak else "n/a")
        rows.append(row)
    headers = ["config", "mode", "params", "batch", "tok/s", "GFLOP/s", "of matmul ceiling"]
    if device.startswith("cuda"):
        headers.append("MFU (bf16 peak)")
    body = table(headers, rows)
    body += (f"\n\n{device} {'bf16' if device.startswith('cuda') else 'fp32'} matmul ceiling (2048^3): "
             f"{ceiling / 1e9:,.0f} GFLOP/s; threads {torch.get_num_threads()}; {args.steps} timed steps after 3 "
             "warm-up steps; FLOPs/token = 6N + 12*L*H*Q*T")
    record(f"Training throughput on {device} (bench/train.py)", body)


if __name__ == "__main__":
    main()
