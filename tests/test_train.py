import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miniglm.cli import main
from miniglm.config import load_config
from miniglm.corpus import PrepareOptions, prepare_corpus
from miniglm.fileio import UserError
from miniglm.shards import tokenize_corpus
from miniglm.tokenizer import load_tokenizer
from miniglm.train import train
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.vocab_size=400",
        "batch_size=4", "lr=3e-3", "warmup_steps=2", "eval_batches=2", "log_every=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, world_dir, bpe_dir):
    root = tmp_path_factory.mktemp("train")
    prepare_corpus([str(world_dir / "corpus.jsonl")], root / "corpus", PrepareOptions(split="file", val_fraction=0.1))
    tokenize_corpus(root / "corpus", load_tokenizer(bpe_dir), root / "data")
    return root / "data"


def cfg_for(data_dir, out, *extra):
    return load_config(None, [f"data={data_dir}", f"out_dir={out}", *TINY, *extra])


def losses(run) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_config_overrides_and_errors(tmp_path):
    (tmp_path / "c.toml").write_text('max_steps = 7\nlr = 1\n[model]\nstyle = "gpt2"\n')
    cfg = load_config(tmp_path / "c.toml", ["model.n_layer=3", "compile=true", "out_dir=runs/x"])
    assert cfg.max_steps == 7 and cfg.lr == 1.0 and cfg.model.style == "gpt2" and cfg.model.n_layer == 3
    assert cfg.compile is True and cfg.out_dir == "runs/x"
    with pytest.raises(UserError, match="unknown key 'max_step'"):
        load_config(None, ["max_step=3"])
    with pytest.raises(UserError, match="must be an integer"):
        load_config(None, ["max_steps=abc"])
    with pytest.raises(UserError, match="unknown model key"):
        load_config(None, ["model.layers=3"])


def test_non_finite_settings_are_refused():
    for key in ("lr=inf", "min_lr=nan", "grad_clip=inf", "model.rope_theta=inf", "model.norm_eps=nan"):
        with pytest.raises(UserError, match="finite|greater than 0|at least 0"):  # each named, nan too
            load_config(None, [key])


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, data_dir, capsys):
    """A loss that becomes nan or inf stops training with one line and exit 1; no checkpoint is written
    after it (the one of step 2 stays, finite)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    sets = [f"data={data_dir}", f"out_dir={out}", *TINY, "max_steps=40", "eval_every=2", "warmup_steps=0",
            "lr=1e3", "grad_clip=0"]  # an absurd step size: the weights blow up within a few steps
    assert main(["train", *sum((["--set", a] for a in sets), [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the loss became" in err[0] and "last good checkpoint" in err[0], err
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["step"] >= 2 and f"by step {state['step']}" not in err[0]
    assert all(torch.isfinite(t).all() for t in load_file(out / "ckpt" / "model.safetensors").values())


def test_pretrain_writes_a_run(tmp_path, data_dir):
    out = tmp_path / "run"
    summary = train(cfg_for(data_dir, out, "max_steps=30", "eval_every=15"))
    ls = losses(out)
    assert len(ls) == 30 and ls[30] < ls[1] - 0.4
    for name in ["model.safetensors", "config.json", "state.json", "optim.pt"]:
        assert (out / "ckpt" / name).exists()
    assert (out / "best" / "model.safetensors").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert "val_bpb" in summary and summary["steps"] == 30
    again = train(cfg_for(data_dir, out, "max_steps=30", "eval_every=15"))  # a finished run, rerun
    # Exactly: the rerun evaluates the step-30 weights (saved bit for bit) with the same code on the same
    # validation batches in this process, the very float32 operations of the first run's last evaluation.
    assert again["steps"] == 30 and again["val_loss"] == summary["val_loss"]
    assert len(losses(out)) == 30
    assert load_config(out / "config.toml").max_steps == 30
    assert main(["plot", str(out)]) == 0 and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_resume_after_sigkill_gives_the_same_losses(tmp_path, data_dir, style):
    args = [f"data={data_dir}", *TINY, f"model.style={style}", "max_steps=24", "eval_every=8", "save_every=3",
            "model.dropout=0.1"]
    ref = tmp_path / "ref"
    train(load_config(None, [*args, f"out_dir={ref}"]))

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "miniglm.cli", "train", *sum((["--set", a] for a in [*args, f"out_dir={run}"]), [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:  # the checkpoint folder is being replaced every 3 steps: it may be gone for an instant
            if json.loads((run / "ckpt" / "state.json").read_text())["step"] >= 9:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from miniglm.fileio import recover_dir

    killed_at = json.loads((recover_dir(run / "ckpt") / "state.json").read_text())["step"]
    assert 9 <= killed_at < 24
    train(load_config(None, [*args, f"out_dir={run}"]))  # the same command again
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    # Exactly, as after Ctrl-C below: the rerun resumes from weights, optimizer state, RNG (dropout) and data
    # position saved bit for bit and does the very same float32 operations, with the same thread count.
    assert a == b


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_resume_after_ctrl_c_gives_the_same_losses(tmp_path, data_dir, style):
    """Ctrl-C lets the step under way finish and saves there; the rerun logs the very losses of a run never
    interrupted (a save between checkpoints: save_every=10, interrupted at a step in between)."""
    args = [f"data={data_dir}", *TINY, f"model.style={style}", "max_steps=30", "eval_every=15", "save_every=10",
            "model.dropout=0.1", "grad_accum=2"]
    ref = tmp_path / "ref"
    train(load_config(None, [*args, f"out_dir={ref}"]))

    run = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "miniglm.cli", "train", *sum((["--set", a] for a in [*args, f"out_dir={run}"]), [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run) if (run / "metrics.jsonl").exists() else {}) < 13:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    stopped_at = json.loads((run / "ckpt" / "state.json").read_text())["step"]
    assert 13 <= stopped_at < 30, stopped_at
    train(load_config(None, [*args, f"out_dir={run}"]))  # the same command again
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert a == b  # exactly: the same computation (same float32 ops, same order), from the same state


def test_ctrl_c_saves_a_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "miniglm.cli", "train",
           *sum((["--set", a] for a in [f"data={data_dir}", *TINY, "max_steps=100000", "eval_every=100000",
                                         f"out_dir={run}"]), [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    state = json.loads((run / "ckpt" / "state.json").read_text())
    assert state["step"] >= 1 and "Traceback" not in err


def test_two_processes_match_one(tmp_path, data_dir):
    """torchrun + DDP (gloo on CPU), 2 x batch 4 == 1 x batch 8: the same losses. On the CPU on any machine
    (a one-GPU machine would refuse two processes on its GPU: test_more_processes_than_gpus_is_one_line)."""
    common = [f"data={data_dir}", *TINY, "max_steps=6", "eval_every=6", "device=cpu"]
    one = tmp_path / "one"
    train(load_config(None, [*common, "batch_size=8", f"out_dir={one}"]))
    two = tmp_path / "two"
    port = free_port()  # for the rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1",
           "-m", "miniglm.cli", "train", *sum((["--set", a] for a in [*common, "batch_size=4", f"out_dir={two}"]), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[:2000] + "\n...\n" + out.stderr[-1000:]
    a, b = losses(one), losses(two)
    # Not exact: two half-batch means averaged by all-reduce, and gradients summed in another order (another
    # thread count too), then 6 AdamW steps. Measured ~1e-7 of the losses (~6); 2e-5 of each (~150 float32
    # roundings) is ~1% of what one step changes the loss by (~1e-2), which any wrong gradient would upset.
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= 2e-5 * abs(a[s]) for s in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh suite runs it)")
def test_more_processes_than_gpus_is_one_line(tmp_path, data_dir):
    """torchrun with one process more than the machine has GPUs: each rank past them stops with one line
    that says so, before any process group or CUDA call (not CUDA's 'invalid device ordinal')."""
    n = torch.cuda.device_count() + 1
    port = free_port()
    sets = [f"data={data_dir}", *TINY, "max_steps=2", "device=cuda", f"out_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           "--master_addr=127.0.0.1", "-m", "miniglm.cli", "train", *sum((["--set", a] for a in sets), [])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert (f"miniglm: error: torchrun started {n} processes on this machine but it has {n - 1} GPU"
            in out.stdout + out.stderr)
    assert "invalid device ordinal" not in out.stderr


def test_sft_trains_on_answers_from_a_pretrained_run(tmp_path, data_dir, world_dir, bpe_dir):
    from miniglm.sft.data import prepare_sft
    from miniglm.train import SFTData

    base = tmp_path / "base"
    train(cfg_for(data_dir, base, "max_steps=10", "eval_every=10"))
    sft_data = tmp_path / "sft"
    meta = prepare_sft(world_dir / "sft_train.jsonl", load_tokenizer(bpe_dir), sft_data, max_len=33)
    assert meta["train_records"] > 0
    batch = SFTData(str(sft_data), 32, 0).next_batch(4)
    x, y = batch["idx"], batch["targets"]
    tok = load_tokenizer(bpe_dir)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        trained = [t for t in row_y if t != -100]
        assert trained[-1] == tok.special("<|end|>")  # the end-of-turn token is trained
        first = row_y.index(trained[0])
        assert row_x[first] == tok.special("<|assistant|>")  # answers start right after the role token
    run = tmp_path / "sft_run"
    summary = train(cfg_for(sft_data, run, "stage=\"sft\"", f"init_from={base}", "max_steps=20", "eval_every=10"))
    ls = losses(run)
    assert ls[20] < ls[1] and summary["val_loss"] < 10
    with pytest.raises(UserError, match="--max-len 17"):  # rows longer than the context: answers would be cut
        SFTData(str(sft_data), 16, 0)


def test_lora_adapter_and_merge(tmp_path, data_dir):
    from miniglm.runs import load_model as load_model_from

    base = tmp_path / "base"
    train(cfg_for(data_dir, base, "max_steps=4", "eval_every=4"))
    run = tmp_path / "lora"
    train(cfg_for(data_dir, run, f"init_from={base}", "lora_r=4", "lr=1e-2", "max_steps=8", "eval_every=8"))
    assert (run / "ckpt" / "adapter.safetensors").exists() and not (run / "ckpt" / "model.safetensors").exists()
    adapted = load_model_from(run).eval()
    base_model = load_model_from(base).eval()
    adapter_keys = set(json.loads((run / "ckpt" / "adapter_config.json").read_text())["target_modules"])
    assert adapter_keys == {"q_proj", "v_proj"}
    from safetensors.torch import load_file

    saved = load_file(str(run / "ckpt" / "adapter.safetensors"))
    assert "model.embed_tokens.weight" in saved  # lora_embeddings: new tokens are learned there
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model_from(tmp_path / "merged").eval()
    idx = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        la, lm, lb = adapted(idx)[0], merged(idx)[0], base_model(idx)[0]
    # load_model merges the adapter on load with the same merge_lora as `miniglm merge`, so the same float32
    # weights and code: equal on one machine (0 here); 1e-6 of the logits' size leaves a few roundings.
    torch.testing.assert_close(lm, la, rtol=0, atol=1e-6 * la.abs().max().item())
    # the adapter learned something: logits (~1) moved by far more than float32 rounding (measured ~1.5)
    assert not torch.allclose(la, lb, atol=1e-4)


def test_import_seed_checkpoint(tmp_path):
    from miniglm.model import MiniGLM, ModelConfig
    from miniglm.runs import load_model as load_model_from

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="gpt2", vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=32))
    # The seed's format: nanoGPT's ckpt.pt, compiled model keys, the causal-mask buffers, model_args.
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    for i in range(2):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    model_args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": True, "vocab_size": 101,
                  "dropout": 0.0}
    torch.save({"model": sd, "model_args": model_args, "iter_num": 500, "best_val_loss": 2.5,
                "config": {"batch_size": 12}}, tmp_path / "ckpt.pt")
    assert main(["import-ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")]) == 0
    imported = load_model_from(tmp_path / "run").eval()
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        want = model.eval()(idx)[0]
        # The seed's weights copied bit for bit into the same code: equal on one machine (0 here); 1e-6 of the
        # logits' size (~0.5) leaves a few float32 roundings, far below a misplaced or transposed weight.
        torch.testing.assert_close(imported(idx)[0], want, rtol=0, atol=1e-6 * want.abs().max().item())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["import-ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "r2")]) == 2


def test_init_from_a_hugging_face_model(tmp_path, data_dir):
    from miniglm.export import export_hf

    base = tmp_path / "base"
    train(cfg_for(data_dir, base, "max_steps=30", "eval_every=30"))
    export_hf(base, tmp_path / "hf")  # a LlamaForCausalLM folder, as from the hub
    run = tmp_path / "from_hf"
    summary = train(cfg_for(data_dir, run, f"init_from={tmp_path / 'hf'}", "max_steps=3", "eval_every=3"))
    assert summary["steps"] == 3
    # it starts where the base model ended (~5.4), not from scratch (ln 400 = 6.0): losses of different
    # batches, so a loose 0.3 (batch-to-batch spread); float32 rounding (~1e-6) plays no part
    assert losses(run)[1] < 5.8 and abs(losses(run)[1] - losses(base)[30]) < 0.3


def test_cuda_device_gets_an_index(monkeypatch):
    """device=cuda (or auto on a GPU machine) names an index: torch.cuda.set_device refuses a bare "cuda"."""
    from torch.cuda._utils import _get_device_index

    from miniglm.train import setup_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(_get_device_index(d)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as seen by torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    device, rank, world, dtype = setup_device(load_config(None, ["device=cuda"]))
    assert (device, chosen, world, dtype) == ("cuda:0", [0], 1, torch.bfloat16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """With reuse_freed_memory (as training on CPU sets it), a freed 64 MB activation's memory is reused by
    the next one: no page faults, where glibc's defaults unmap it and fault every page in again."""
    code = """if 1:
        import resource, sys, torch
        from miniglm.train import reuse_freed_memory
        if sys.argv[1] == "reuse":
            assert reuse_freed_memory()
        for _ in range(3):  # a training step's pattern: a large activation, used, freed
            torch.ones(16 << 20).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    assert faults["reuse"] * 10 < faults["default"], faults  # 0 against 16,385 with 4 kB pages


def test_model_keys_that_a_checkpoint_overrides_are_refused(tmp_path, data_dir, capsys):
    """On resume and with init_from the architecture is the checkpoint's: a model key given that differs is
    one line (it was silently ignored), one that agrees is fine."""
    out = tmp_path / "run"
    sets = [f"data={data_dir}", f"out_dir={out}", *TINY, "max_steps=2", "eval_every=2"]
    assert main(["train", *sum((["--set", a] for a in sets), [])]) == 0
    more = ["--set", "max_steps=3"]
    assert main(["train", *sum((["--set", a] for a in sets), []), *more, "--set", "model.n_layer=4"]) == 2
    assert "model.n_layer = 4, but the model of the run" in capsys.readouterr().err
    sft = [f"data={data_dir}", f"out_dir={tmp_path / 'ft'}", f"init_from={out}", "max_steps=1", "eval_batches=1"]
    assert main(["train", *sum((["--set", a] for a in sft), []), "--set", "model.block_size=64"]) == 2
    assert "model.block_size = 64, but the model of init_from" in capsys.readouterr().err
    assert main(["train", *sum((["--set", a] for a in sft), []), "--set", "model.block_size=32"]) == 0


def test_threads_is_the_runs_setting_alone(tmp_path, data_dir):
    """threads = 1 holds for the run; the calling process gets its thread count back (a test or a notebook
    that trained with it computed in one thread ever after, and another run's sums came out otherwise)."""
    before = torch.get_num_threads()
    train(cfg_for(data_dir, tmp_path / "run", "max_steps=1", "eval_batches=1", "threads=1"))
    assert torch.get_num_threads() == before
