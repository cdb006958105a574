"""Training throughput side by side with nanoGPT: tokens/s, and achieved GFLOP/s against the machine's matmul ceiling.

Two sizes, each with nanoGPT's `GPT` (the model.py under --nanogpt) and miniglm's gpt2 and llama styles at
equal width, depth, vocab, batch and block: the demo config (4 x 128, vocab 4096, 16 x 128: what `miniglm
demo` trains; its llama has 2 key/value heads) and 13.8M (6 x 384, vocab 8192, 16 x 256: nanoGPT's size).
A step is what both training loops do: forward, backward, clip the gradient norm at 1.0, AdamW, zero_grad
(each with its own optimizer setup: miniglm's make_optimizer, nanoGPT's configure_optimizers). The
contestants of a size run in interleaved rounds in one process, so a shared machine's load hits them alike;
each one's tok/s is its best round. FLOPs per token follow nanoGPT's estimate, 6N + 12*L*H*Q*T, with each
model's own N (they differ: biases, SwiGLU's rounded width). On CUDA (--device cuda, bf16 autocast) a
GPT-2-small size is added, with MFU against the bf16 peak.

    .venv/bin/python bench/train.py [--steps 2] [--rounds 5] [--modes eager,compile] [--sizes demo,13.8M]
                                    [--nanogpt PATH] [--device cpu|cuda]
    .venv/bin/python bench/train.py --profile [--sizes 13.8M]     # where a step's time goes, per model
    .venv/bin/python bench/train.py --count-ops [--sizes 124M]     # aten ops per step, fp32 and bf16 autocast
    .venv/bin/python bench/train.py --modes eager --malloc          # also under glibc's default allocator
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, profile_shares, record, table  # noqa: E402

from miniglm.config import load_config  # noqa: E402
from miniglm.model import MiniGLM, ModelConfig  # noqa: E402
from miniglm.train import make_optimizer, reuse_freed_memory  # noqa: E402

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks
NANOGPT = ROOT.parent / "shared" / "reference" / "nanogpt"


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


def load_nanogpt(path: Path):
    """nanoGPT's model.py as a module (a folder holding it, or the file), or None if there is none."""
    file = path / "model.py" if path.is_dir() else path
    if not file.is_file():
        print(f"no nanoGPT model.py at {path}: its rows are left out", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Contestant:
    """One model, its optimizer and a fixed random batch; step() is one training step. On CPU it runs as
    `miniglm train` does, freed memory kept for reuse (main calls train.reuse_freed_memory once);
    DefaultMallocGroup's contestants run in a process that never does."""

    malloc = "reuse"

    def __init__(self, name: str, size: str, model, opt, cfg: ModelConfig, batch: int, device: str, compile: bool):
        self.name, self.size, self.model, self.opt, self.cfg, self.batch = name, size, model, opt, cfg, batch
        self.device, self.compile = device, compile
        self.step_model = torch.compile(model) if compile else model
        self.n_params = sum(p.numel() for p in model.parameters()) - (  # nanoGPT's count: no position table
            model.transformer.wpe.weight.numel() if hasattr(model, "transformer") else 0)
        T = cfg.block_size
        self.x = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
        cuda = device.startswith("cuda")
        self.autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)
        self.best, self.warm = 0.0, 0.0

    def step(self, mark=lambda phase: contextlib.nullcontext()) -> None:
        """One training step; mark(phase) wraps each phase (count_ops labels them for the profiler)."""
        with mark("forward"), self.autocast:
            _, loss = self.step_model(self.x, self.y)
        with mark("backward"):
            loss.backward()
        with mark("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def flops_per_token(self) -> float:
        c = self.cfg
        return 6 * self.n_params + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


def contestants(size: str, cfg: ModelConfig, batch: int, device: str, compile: bool, nanogpt) -> list[Contestant]:
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    train_cfg = load_config(None)
    out = []
    if nanogpt is not None:
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count and optimizer
            model = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                                  dropout=0.0, bias=True)).to(device)
            opt = model.configure_optimizers(train_cfg.weight_decay, train_cfg.lr, (train_cfg.beta1, train_cfg.beta2),
                                             device_type)
        out.append(Contestant("nanoGPT", size, model, opt, cfg, batch, device, compile))
    for style in ("gpt2", "llama"):
        c = cfg if cfg.style == style else ModelConfig(**{**cfg.to_dict(), "style": style, "n_kv_head": 0,
                                                          "intermediate_size": 0})
        torch.manual_seed(0)
        model = MiniGLM(c).to(device)
        out.append(Contestant(f"miniglm {style}", size, model, make_optimizer(model, train_cfg, device_type), c,
                              batch, device, compile))
    return out


PROFILE_GROUPS = {"loss": ("log_softmax", "nll_loss", "cross_entropy"), "optimizer": ("adam", "foreach"),
                  "norm": ("norm",)}


def profile(sizes: dict, nanogpt, device: str) -> None:
    """Where one eager training step's time goes, per contestant: the shares of the aten ops' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for size, (cfg, batch) in sizes.items():
        for c in contestants(size, cfg, batch, device, False, nanogpt):
            c.run(2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall = c.run(2) / 2
            share, largest, ops = profile_shares(prof, PROFILE_GROUPS)
            rows.append([size, c.name, f"{wall * 1e3:,.0f}", f"{ops / 2:,.0f}",
                         *(f"{share[k]:.0%}" for k in ("matmul", "attention", *PROFILE_GROUPS, "other")), largest])
            print(" | ".join(rows[-1]), flush=True)
    record(f"Training step profile (bench/train.py --profile, {device})",
           table(["size", "model", "ms per step (profiled)", "ops per step", "matmul", "attention",
                  *PROFILE_GROUPS, "other", "largest others"], rows)
           + f"\n\neager fp32, threads {torch.get_num_threads()}; a step as in the throughput table; shares of the "
           "aten ops' own CPU time (torch.profiler), backward ops included")


PHASES = ("forward", "backward", "optimizer")


def step_ops(c: Contestant) -> dict[str, collections.Counter]:
    """The aten ops of one training step of c, per phase: every aten:: event torch.profiler records, nested
    ones included (aten::linear and the t and addmm under it each count: each is a trip through the
    dispatcher, which is what an eager step on a GPU waits on). A phase holds the ops that start inside its
    range, on any thread (CUDA's backward runs on the autograd engine's own thread)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    c.step()  # warm: the optimizer's state exists, lazy inits are done
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.step(lambda phase: record_function(f"step:{phase}"))
    events = prof.events()
    ranges = {e.name[5:]: e.time_range for e in events if e.name.startswith("step:")}
    counts = {phase: collections.Counter() for phase in PHASES}
    for e in events:
        if e.name.startswith("aten::"):
            phase = next((p for p, r in ranges.items() if r.start <= e.time_range.start <= r.end), None)
            if phase is not None:
                counts[phase][e.name[6:]] += 1
    return counts


def count_ops(sizes: dict, nanogpt, device: str, top: int = 8) -> None:
    """aten ops per eager training step, per contestant, in fp32 and under bf16 autocast (on CPU too: its
    autocast casts the same weights and activations as CUDA's, so the casts' _to_copy/copy_ show up here).
    The count depends on the layers, barely on the batch and sequence length (a few dozen ops in thousands,
    in the backward): counted on 1 x 64 tokens, so 124M's takes seconds on a CPU."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rows = []
    for size, (cfg, _) in sizes.items():
        cfg = ModelConfig(**{**cfg.to_dict(), "block_size": min(cfg.block_size, 64)})
        for precision in ("fp32", "bf16 autocast"):
            for c in contestants(size, cfg, 1, device, False, nanogpt):
                c.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision != "fp32")
                counts = step_ops(c)
                total = sum(counts.values(), collections.Counter())
                rows.append([size, c.name, precision, f"{total.total():,}",
                             *(f"{counts[p].total():,}" for p in PHASES),
                             ", ".join(f"{op} {n}" for op, n in total.most_common(top))])
                print(" | ".join(rows[-1]), flush=True)
    record(f"Training ops per step (bench/train.py --count-ops, {device})",
           table(["size", "model", "precision", "aten ops per step", *PHASES, f"top {top} by count"], rows)
           + "\n\neager, 1 x 64 tokens a step (the count barely depends on them); a step as in the throughput "
           "table; every aten:: event torch.profiler records, nested "
           "ones included (a dispatcher trip each); a phase holds the ops that start in its range. On CPU nanoGPT's "
           "own configure_optimizers picks the unfused AdamW (fused on CUDA only; miniglm's is fused on both), so "
           "compare the forward and backward columns there")


class Measured:
    """A contestant measured in another process: what the table needs of it."""

    def __init__(self, name: str, size: str, cfg: ModelConfig, batch: int, compile: bool, n_params: int,
                 flops: float):
        self.name, self.size, self.cfg, self.batch, self.compile = name, size, cfg, batch, compile
        self.n_params, self.flops, self.malloc, self.best, self.warm = n_params, flops, "default", 0.0, 0.0

    def flops_per_token(self) -> float:
        return self.flops


def _default_malloc_worker(conn, size: str, cfg: dict, batch: int, compile: bool, nanogpt_path) -> None:
    torch.set_num_threads(conn.recv())
    group = contestants(size, ModelConfig(**cfg), batch, "cpu", compile,
                        load_nanogpt(nanogpt_path) if nanogpt_path else None)
    conn.send([(c.name, c.n_params, c.flops_per_token()) for c in group])
    while (steps := conn.recv()) is not None:
        conn.send([c.run(steps) for c in group])


class DefaultMallocGroup:
    """The same contestants in a fresh process that never calls mallopt, so glibc keeps its defaults (its
    mmap threshold rises with the blocks freed; mallopt would fix it, and cannot give the dynamic one back).
    run(steps) runs each one `steps` steps there, between the rounds of this process's contestants."""

    def __init__(self, size: str, cfg: ModelConfig, batch: int, compile: bool, nanogpt_path):
        import multiprocessing

        self.conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_default_malloc_worker, args=(child, size, cfg.to_dict(), batch, compile, nanogpt_path))
        self.proc.start()
        self.conn.send(torch.get_num_threads())
        self.contestants = [Measured(f"{name} (default malloc)", size, cfg, batch, compile, n, flops)
                            for name, n, flops in self.conn.recv()]

    def run(self, steps: int) -> list[float]:
        self.conn.send(steps)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def measure(size: str, cfg: ModelConfig, batch: int, compile: bool, device: str, nanogpt, args) -> list:
    """One size, micro-batch and mode: every contestant's best tok/s over interleaved rounds."""
    steps = args.steps or max(2, 8192 // (batch * cfg.block_size))
    mode = "compile" if compile else "eager"
    group = contestants(size, cfg, batch, device, compile, nanogpt)
    remote = (DefaultMallocGroup(size, cfg, batch, compile, args.nanogpt if nanogpt else None)
              if args.malloc and not device.startswith("cuda") else None)
    for c in group:  # warm-up (and compilation)
        c.warm = c.run(3)
    if remote:
        for c, t in zip(remote.contestants, remote.run(3), strict=True):
            c.warm = t
    for _ in range(args.rounds):
        for c in group:
            c.best = max(c.best, batch * cfg.block_size * steps / c.run(steps))
        if remote:
            for c, t in zip(remote.contestants, remote.run(steps), strict=True):
                c.best = max(c.best, batch * cfg.block_size * steps / t)
    if remote:
        remote.close()
        group += remote.contestants
    for c in group:
        print(f"{size} {c.name} {mode} batch {batch} malloc {c.malloc}: {c.best:,.0f} tok/s (warm-up {c.warm:.1f}s)",
              flush=True)
    return group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0, help="steps per round (default: ~8k tokens' worth, at least 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="eager,compile", help="eager, compile or both (comma-separated)")
    ap.add_argument("--sizes", default="demo,13.8M", help="demo, 13.8M (and 124M on CUDA), comma-separated")
    ap.add_argument("--nanogpt", type=Path, default=NANOGPT, help="nanoGPT's model.py, or the folder holding it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="", help="micro-batch sizes to run each size at, comma-separated (default: "
                    "its own, 16 for 13.8M and 124M); one that does not fit in GPU memory is skipped, said so")
    ap.add_argument("--profile", action="store_true", help="only where one eager step's time goes, per model")
    ap.add_argument("--count-ops", action="store_true", help="only aten ops per step, per model, fp32 and bf16 "
                    "autocast (on CPU too, 124M included)")
    ap.add_argument("--malloc", action="store_true", help="CPU: every contestant also under glibc's defaults (in "
                    "a second process, its rounds interleaved with these; miniglm train keeps freed memory for reuse)")
    args = ap.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    if not cuda:  # as `miniglm train` on CPU (this process only: DefaultMallocGroup's child never calls it)
        reuse_freed_memory()
    nanogpt = load_nanogpt(args.nanogpt)
    demo = load_config(ROOT / "configs" / "demo.toml")
    sizes = {"demo": (demo.model, demo.batch_size),
             "13.8M": (ModelConfig(style="gpt2", vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384),
                       16)}
    if cuda or args.count_ops:
        sizes["124M"] = (ModelConfig(style="gpt2", vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                                     n_embd=768), 16)
    if args.count_ops:
        return count_ops({k: v for k, v in sizes.items() if k in args.sizes.split(",")}, nanogpt, device)
    if args.profile:
        return profile({k: v for k, v in sizes.items() if k in args.sizes.split(",")}, nanogpt, device)
    dtype = torch.bfloat16 if cuda else torch.float32
    ceiling = matmul_ceiling(device, dtype)
    results = []
    listed = args.sizes.split(",") + (["124M"] if cuda and "124M" not in args.sizes else [])
    batches = [int(b) for b in args.batches.split(",")] if args.batches else []
    modes = args.modes.split(",")
    for size, batch, mode in [(s, b, m) for s in listed for b in batches or [sizes[s][1]] for m in modes]:
        try:
            results += measure(size, sizes[size][0], batch, mode == "compile", device, nanogpt, args)
        except torch.cuda.OutOfMemoryError:  # a micro-batch past the GPU's memory: the next one goes on
            print(f"{size} {mode} batch {batch}: out of GPU memory, skipped", flush=True)
            torch.cuda.empty_cache()
    ceiling = max(ceiling, matmul_ceiling(device, dtype))  # the best of before and after the runs
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in torch.cuda.get_device_name()), None) if cuda else None
    rows = []
    for c in results:
        ref = next((r for r in results if r.name == "nanoGPT" and r.size == c.size and r.compile == c.compile
                    and r.malloc == "reuse" and r.batch == c.batch), None)
        flops = c.flops_per_token() * c.best
        row = [c.size, c.name, "compile" if c.compile else "eager", f"{c.n_params / 1e6:.2f}M",
               f"{c.batch}x{c.cfg.block_size}", f"{c.best:,.0f}", f"{c.best / ref.best:.2f}x" if ref else "n/a",
               f"{flops / 1e9:.1f}", f"{100 * flops / ceiling:.0f}%", f"{c.warm:.1f}"]
        if cuda:
            row.append(f"{100 * flops / peak:.1f}%" if peak else "n/a")
        rows.append(row)
    headers = ["size", "model", "mode", "params", "batch", "tok/s", "vs nanoGPT", "GFLOP/s", "of matmul ceiling",
               "warm-up s (3 steps, compile included)"]
    if cuda:
        headers.append("MFU (bf16 peak)")
    body = table(headers, rows)
    body += (f"\n\n{device} {'bf16 autocast' if cuda else 'fp32'}; matmul ceiling (2048^3): {ceiling / 1e9:,.0f} "
             f"GFLOP/s; threads {torch.get_num_threads()}; best of {args.rounds} interleaved rounds; freed memory "
             "kept for reuse as `miniglm train` keeps it (train.reuse_freed_memory; \"default malloc\": glibc's "
             "defaults, in a second process whose rounds alternate with these; \"vs nanoGPT\" against nanoGPT with "
             "reuse); a step is "
             "forward, backward, clip_grad_norm_, AdamW, zero_grad; FLOPs/token = 6N + 12*L*H*Q*T; nanoGPT: "
             f"{args.nanogpt if nanogpt else 'not found'}")
    record(f"Training throughput on {device}, side by side with nanoGPT (bench/train.py)", body)


if __name__ == "__main__":
    main()
