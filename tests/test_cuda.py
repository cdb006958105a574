"""CUDA checks for a lent GPU machine (bench/gpu.sh runs them there); skipped where there is no GPU.

bf16 autocast against fp32, torch.compile of the model, DDP over NCCL under torchrun, and `miniglm train`
on CUDA under torchrun. Tiny models: each test takes seconds, compilation aside.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miniglm.config import load_config
from miniglm.train import make_optimizer
from tests.helpers import free_port, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG["vocab_size"], (8, CONFIG["block_size"] + 1), generator=g).cuda()
    return x[:, :-1], x[:, 1:]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
            "--master_addr=127.0.0.1", *args]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_bf16_autocast_step_is_finite_and_close_to_fp32(style):
    model = tiny(style, **CONFIG).cuda()
    x, y = batch()
    _, fp32 = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, bf16 = model(x, y)
    # bf16 rounds weights and activations to 8 bits (eps 7.8e-3) where fp32 keeps 24: relative to the loss
    # (~ln 512 = 6.2), 2% is a few bf16 roundings; a broken autocast (wrong dtype, overflow) is off by far more
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    opt = make_optimizer(model, load_config(None), "cuda")  # fused AdamW
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, after = model(x, y)
    assert torch.isfinite(after) and after.item() < bf16.item()  # one step on the batch lowers its loss


def test_compile_matches_eager():
    model = tiny(**CONFIG).cuda()
    x, y = batch()
    _, eager = model(x, y)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, compiled = torch.compile(model)(x, y)
    compiled.backward()
    # Inductor fuses and reorders reductions (and matmuls run in TF32, eps 9.8e-4, if an earlier test in this
    # process turned it on: `miniglm train` does on CUDA): relative to the loss (~6.2), 1e-4 of it. On a
    # CPU compiled and eager differ by ~2e-7 of it; a miscompiled forward is off by far more.
    assert abs(compiled.item() - eager.item()) < 1e-4 * abs(eager.item())
    for n, p in model.named_parameters():
        if n in grads:
            # Relative to each tensor's largest gradient (1e-4 for q/k, 7e-3 for o_proj at this init: an
            # absolute 1e-4 would pass any q/k gradient at all): 1% of it, as TF32 may be on (see above); on a
            # CPU they differ by < 1e-6 of it, and a wrong or missing gradient term by O(1) of it.
            want = grads[n]
            torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-2 * want.abs().max().item(),
                                       msg=lambda m, n=n: f"{n}: {m}")


DDP_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_cuda import CONFIG, batch
from tests.helpers import tiny
from miniglm.config import load_config
from miniglm.train import make_optimizer

dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
losses = {{}}
for name in ("plain", "ddp"):
    model = tiny(**CONFIG).cuda()
    opt = make_optimizer(model, load_config(None), "cuda")
    run = torch.nn.parallel.DistributedDataParallel(model) if name == "ddp" else model
    losses[name] = []
    for step in range(3):
        x, y = batch(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[name].append(loss.item())
print("LOSSES " + json.dumps({{"backend": dist.get_backend(), **losses}}))
dist.destroy_process_group()
"""


def test_ddp_over_nccl_under_torchrun(tmp_path):
    """One process, NCCL, DDP: the same losses as the model trained without DDP."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    out = subprocess.run(torchrun(str(script)), cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOSSES "))[7:])
    assert result["backend"] == "nccl"
    assert all(torch.isfinite(torch.tensor(result["ddp"])))
    # One process: DDP's all-reduce averages over one rank, so the same gradients; under bf16 autocast the
    # losses (~6.2) may still differ where a CUDA backward kernel accumulates with atomics (attention) and a
    # weight then rounds to another bf16 value: 2e-4 of the loss, ~1/40 of bf16's eps (7.8e-3).
    assert all(abs(a - b) <= 2e-4 * abs(a) for a, b in zip(result["plain"], result["ddp"], strict=True))


def test_miniglm_train_on_cuda_under_torchrun(tmp_path, world_dir, bpe_dir):
    """`miniglm train` on the GPU (bf16 autocast, fused AdamW) launched by torchrun, a few steps."""
    from miniglm.corpus import PrepareOptions, prepare_corpus
    from miniglm.shards import tokenize_corpus
    from miniglm.tokenizer import load_tokenizer

    prepare_corpus([str(world_dir / "corpus.jsonl")], tmp_path / "corpus", PrepareOptions(split="file"))
    tokenize_corpus(tmp_path / "corpus", load_tokenizer(bpe_dir), tmp_path / "data")
    sets = [f"data={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}", "device=cuda", "max_steps=8", "eval_every=4",
            "eval_batches=2", "log_every=1", "batch_size=4", "warmup_steps=2", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32", "model.block_size=32", "model.vocab_size=400"]
    cmd = torchrun("-m", "miniglm.cli", "train", *sum((["--set", s] for s in sets), []))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(v) and v < 20 for v in losses)
    assert [r["val_bpb"] for r in rows if "val_bpb" in r][-1] > 0
