"""One training loop for pretraining and SFT, full or LoRA, on CPU, one GPU or several (torchrun + DDP).

Exact resume: a checkpoint holds the weights, the optimizer state, the step, the data sampler's
position and the RNG states, so rerunning the same command after a kill continues with the very
losses an uninterrupted run would have logged.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from miniglm import checkpoint, fileio, hf, lora, runs
from miniglm.config import TrainConfig, save_config
from miniglm.devices import resolve_device
from miniglm.fileio import UserError, read_jsonl, recover_dir
from miniglm.model import MiniGLM, ModelConfig
from miniglm.sft.templates import IGNORE
from miniglm.shards import load_meta, open_shards, tokenizer_of
from miniglm.tokenizer import Tokenizer, identity, load_tokenizer

EVAL_SEED = 20240607  # eval batches are the same at every eval, and independent of training's RNG


# --- data ----------------------------------------------------------------------------------------
class PretrainData:
    """Random windows of the token shards; the sampler is a seeded numpy Generator."""

    def __init__(self, data_dir: str, block_size: int, seed: int):
        self.train, self.val, self.meta = open_shards(data_dir)
        self.block_size = block_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self, n: int) -> dict:
        x, y = self.train.sample(n, self.block_size, self.rng)
        return {"idx": x, "targets": y}

    def eval_batches(self, n_batches: int, batch_size: int):
        rng = np.random.default_rng(EVAL_SEED)
        for _ in range(n_batches):
            x, y = self.val.sample(batch_size, self.block_size, rng)
            yield {"idx": x, "targets": y}

    def bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / self.meta["val_tokens"]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class SFTData:
    """Rendered SFT records, in a fresh seeded permutation each epoch. Padding on the side the template
    asks for (left: with an attention mask); packed rows get position ids that restart per record."""

    def __init__(self, data_dir: str, block_size: int, seed: int):
        d = Path(data_dir)
        self.meta = load_meta(d)
        self.train = self._records(d / "train.jsonl")
        self.val = self._records(d / "val.jsonl") if (d / "val.jsonl").exists() else []
        if not self.train:
            raise UserError(f"{d / 'train.jsonl'}: no records")
        longest = max(len(r["ids"]) for r in self.train + self.val)
        if longest > block_size + 1:  # a row is cut from the right: its answer would be lost, silently
            raise UserError(f"{d}: records of up to {longest} tokens, past the model's context of {block_size}; "
                            f"prepare them again with `sft prepare --max-len {block_size + 1}`")
        self.block_size, self.seed, self.pad_id = block_size, seed, self.meta.get("pad_id", 0)
        self.left = self.meta.get("padding_side") == "left"
        self.epoch, self.cursor = 0, 0
        self.order = self._order()

    @staticmethod
    def _records(path: Path) -> list[dict]:
        return [r for _, r in read_jsonl(path, encoding_flag=False)]  # written by `sft prepare`: no --encoding

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.train))

    def collate(self, records: list[dict]) -> dict:
        """Rows of T+1 tokens -> inputs ids[:, :-1] and targets labels[:, 1:] (labels are aligned with ids)."""
        T = min(max(len(r["ids"]) for r in records), self.block_size + 1)
        ids = torch.full((len(records), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(records), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(records), T), dtype=torch.long)
        pos = torch.arange(T).repeat(len(records), 1)
        packed = False
        for i, r in enumerate(records):
            n = min(len(r["ids"]), T)
            where = slice(T - n, T) if self.left else slice(0, n)
            ids[i, where] = torch.tensor(r["ids"][:n])
            labels[i, where] = torch.tensor(r["labels"][:n])
            mask[i, where] = 1
            if "lengths" in r:  # positions restart at each packed record; padding continues the last one
                packed = True
                restart = torch.cat([torch.arange(length) for length in r["lengths"]])[:n]
                pos[i, :n] = restart
                pos[i, n:] = restart[-1] + 1 + torch.arange(T - n)
        batch = {"idx": ids[:, :-1], "targets": labels[:, 1:]}
        if self.left:
            batch["attention_mask"] = mask[:, :-1]
        if packed:
            batch["position_ids"] = pos[:, :-1]
        return batch

    def next_batch(self, n: int) -> dict:
        picked = []
        while len(picked) < n:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            picked.append(self.train[self.order[self.cursor]])
            self.cursor += 1
        return self.collate(picked)

    def eval_batches(self, n_batches: int, batch_size: int):
        for i in range(0, min(len(self.val), n_batches * batch_size), batch_size):
            yield self.collate(self.val[i:i + batch_size])

    def bytes_per_token(self) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()


# --- helpers -------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings; none on biases and norm weights. Fused AdamW on CPU too:
    a step 4x faster than the foreach one (13.8M parameters, torch 2.13)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the lines logged after the checkpoint: they are about to be logged again."""
    if path.exists():  # a torn last line (a kill mid-append) goes too
        rows = [row for row in fileio.read_log(path) if row["step"] <= last_step]
        fileio.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class Interrupt:
    """Ctrl-C while training: the first only asks the loop to stop after the step under way, so the checkpoint
    saved there is a step boundary (weights, optimizer, sampler and RNG states all as of that step, no half
    accumulated gradient) and a rerun continues exactly. A second Ctrl-C stops at once, without saving."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("miniglm: interrupted: saving a checkpoint after this step (Ctrl-C again to stop now, "
              "without saving)", file=sys.stderr, flush=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse rather than give it back to the kernel at once. By default a
    block over its mmap threshold (128 kB, rising to at most 32 MB) is unmapped when freed, so every
    training step maps its large activations anew and the kernel zeroes them page by page as they are first
    touched (a 16 x 256 batch's logits over an 8k vocabulary are 134 MB; glibc's threshold stops at 32 MB):
    1.15-1.23x tokens/s for the llama style on the 2-core CPU (bench/train.py --malloc). The cost: the
    process holds its peak memory until it ends. True where it took effect (Linux with glibc)."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): its allocator as it is
        return False


def setup_device(cfg: TrainConfig) -> tuple[str, int, int, torch.dtype]:
    """(device, rank, world size, autocast dtype). Under torchrun, one process per device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)  # "cuda" is LOCAL_RANK's GPU; more processes than GPUs: one line
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device == "cpu":
        reuse_freed_memory()
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    if dtype is None:
        raise UserError(f"dtype must be auto, float32 or bfloat16, got '{cfg.dtype}'")
    return device, rank, world, dtype


def check_model_keys(cfg: TrainConfig, loaded: ModelConfig, source: str) -> None:
    """A model key given in the config or by --set that differs from the loaded model's: one line, not ignored."""
    for key in sorted(getattr(cfg, "model_keys", ())):
        asked, have = getattr(cfg.model, key), getattr(loaded, key)
        if asked != have:
            raise UserError(f"model.{key} = {asked!r}, but the model of {source} has {have!r}: its architecture "
                            f"comes from its checkpoint; leave model.{key} out, or train a new run elsewhere")


class Diverged(UserError):
    """The loss became nan or inf: the run stops (exit 1: the input was fine, the training failed)."""
    exit_code = 1


def to_device(batch: torch.Tensor, device: str) -> torch.Tensor:
    """A batch to the training device; to a GPU through pinned memory, so the copy does not stall the host."""
    if device == "cpu":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def any_rank(flag: bool, world: int) -> bool:
    """True on every process if it is on one: all stop at the same step (Ctrl-C reaches each at its own time)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_mean(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


# --- where a run starts: its checkpoint, its tokenizer, its model --------------------------------
@dataclass
class Resume:
    """The run's own last checkpoint, to continue exactly where it stopped."""
    ckpt: Path
    state: dict  # state.json, with everything an exact resume reads


def find_resume(out: Path) -> Resume | None:
    if not (recover_dir(out / "ckpt") / "state.json").exists():
        return None
    ckpt = runs.find_checkpoint(out)
    return Resume(ckpt, runs.read_resume_state(ckpt))


def run_tokenizer(cfg: TrainConfig, out: Path, meta: dict, resume: Resume | None,
                  master: bool) -> tuple[dict | None, Tokenizer | None]:
    """The identity of the tokenizer the run trains with (state.json records it), checked here, once, against
    the data's; and, for a new run, the tokenizer it saves (on the main process): its own tokenizer/ if a
    start killed early left one, else cfg.tokenizer, else the data's. A run resumed or started from
    (init_from) must have been trained with the data's tokenizer too."""
    data_tok = meta.get("tokenizer_identity")
    tok, have = None, []
    if resume is not None:
        ident = resume.state.get("tokenizer_identity", data_tok)
        have.append((resume.state.get("tokenizer_identity"), f"the run {out} it resumes"))
    else:
        ident = data_tok
        if cfg.init_from != "scratch" and runs.is_run(cfg.init_from):
            have.append((runs.tokenizer_identity(cfg.init_from), f"init_from {cfg.init_from}"))
        if master:
            tok_dir = out / "tokenizer"
            tok = load_tokenizer(tok_dir if tok_dir.exists() else cfg.tokenizer or tokenizer_of(cfg.data),
                                 cfg.trust_remote_code)
            ident = identity(tok)
            have.append((ident, f"the tokenizer {tok.name}"))
    for recorded, where in have:
        runs.check_same_tokenizer(data_tok, cfg.data, recorded, where)
    return ident, tok


def resolve_ref(ref: str) -> str:
    """A local folder as an absolute path (a run resumes from anywhere); a hub name as it is."""
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def hf_model(cfg: TrainConfig, resume: Resume | None, meta: dict) -> tuple[hf.HFCausalLM, str]:
    """The model trained when hf = true (a Hugging Face model trained as it is, LoRA included), and the base
    model state.json names. Resuming, a full fine-tune reloads its checkpoint; a LoRA run reloads its base and
    then its adapter. init_from may be an HF run (`miniglm finetune`): opened by miniglm.runs."""
    ckpt, state = (resume.ckpt, resume.state) if resume else (None, None)
    if ckpt is None and cfg.init_from in ("", "scratch"):
        raise UserError("hf = true needs init_from = a Hugging Face model name or folder")
    base = state["base_model"] if state else resolve_ref(cfg.init_from)
    # A big base model in bf16 on a GPU when only the adapters train; fp32 otherwise (the loop autocasts).
    bf16 = cfg.lora_r > 0 and cfg.dtype != "float32" and cfg.device != "cpu" and torch.cuda.is_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    # An architecture outside FAMILIES is fine-tuned with the template its data was rendered with.
    if ckpt is not None and cfg.lora_r == 0:
        model = hf.load_run_model(ckpt, state, dtype)
    elif runs.is_run(base) and (run := runs.open_run(base)).hf:
        model = runs.load_model(run, dtype=dtype)
    else:
        model = hf.load_model(base, cfg.trust_remote_code, dtype, template=meta.get("template", "hf"))
    if cfg.lora_r > 0:
        torch.manual_seed(cfg.seed)
        model.add_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, resume_from=ckpt)
    return model, base


def model_source(cfg: TrainConfig, out: Path, resume: Resume | None, meta: dict) -> tuple[torch.nn.Module, str | None]:
    """The model to train, and the base model state.json names: a Hugging Face model (hf = true), else the
    run's own last checkpoint (resuming), else init_from (a run, or a Hugging Face GPT-2 / Llama), else a new
    one (scratch). A loaded MiniGLM keeps its checkpoint's architecture: cfg.model becomes its config."""
    if cfg.hf:
        model, base = hf_model(cfg, resume, meta)
    elif resume is not None:
        model, base = runs.load_base_model(resume.ckpt), resume.state.get("base_model")
    elif cfg.init_from != "scratch":
        model = runs.load_any(cfg.init_from)
        base = str(runs.find_checkpoint(cfg.init_from).resolve()) if runs.is_run(cfg.init_from) else cfg.init_from
    else:
        torch.manual_seed(cfg.seed)
        model, base = MiniGLM(cfg.model), None
    if not cfg.hf:
        if resume is not None or cfg.init_from != "scratch":  # a differing model key is an error
            check_model_keys(cfg, model.config, f"the run {out} it resumes" if resume else f"init_from {cfg.init_from}")
        cfg.model = model.config
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"the model's vocab ({model.config.vocab_size}) is smaller than the data's tokenizer's")
    return model, base


def add_adapter(cfg: TrainConfig, model: torch.nn.Module, resume: Resume | None) -> dict | None:
    """LoRA on a MiniGLM (lora_r > 0): adapter layers added, and their weights loaded when resuming; only they
    train. Returns the adapter's config, saved with each checkpoint. (An HF model's LoRA is PEFT's: hf_model.)"""
    if cfg.lora_r <= 0 or cfg.hf:
        return None
    torch.manual_seed(cfg.seed)
    config = lora.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                           train_embeddings=cfg.lora_embeddings)
    if resume is not None:
        runs.load_adapter_weights(model, resume.ckpt)
    return config


def restore(resume: Resume, optimizer: torch.optim.Optimizer, data, out: Path, master: bool,
            log) -> tuple[int, float]:
    """The optimizer, sampler and RNG states as the checkpoint left them; the metrics logged after it go
    (they are about to be logged again). Returns the step and the best val loss so far."""
    runs.load_optimizer_state(resume.ckpt, optimizer)
    step, best_val = resume.state["step"], resume.state["best_val_loss"]
    try:
        data.load_state_dict(resume.state["sampler"])
        set_rng_state(resume.state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise runs.damaged(resume.ckpt / "state.json", f"the sampler or RNG state: {type(e).__name__} {e}",
                           "delete the run's ckpt/ to start over, or restore it") from None
    if master:
        log(f"resuming {out} at step {step}")
        trim_metrics(out / "metrics.jsonl", step)
    return step, best_val


def start_run(cfg: TrainConfig, out: Path, tok: Tokenizer) -> None:
    """A new run, on the main process: its folder marked, no old metrics, its tokenizer saved."""
    fileio.mark_dir(out)  # refuses a folder with files miniglm did not write
    (out / "metrics.jsonl").unlink(missing_ok=True)
    if not (out / "tokenizer").exists():
        checkpoint.save_tokenizer(out, tok)
    torch.manual_seed(cfg.seed + 1)  # the training RNG (dropout), the same on every process


def write_chat_info(cfg: TrainConfig, out: Path, meta: dict) -> None:
    """chat.json names the template a run was fine-tuned with, so generate/chat/serve render the same way.
    A run fine-tuned from another keeps its parent's, unless its own SFT data names one."""
    chat = None
    if cfg.stage == "sft":
        chat = (meta.get("template", "miniglm"), meta.get("template_options", {}))
    elif cfg.init_from != "scratch" and runs.is_run(cfg.init_from):
        chat = runs.read_chat(runs.run_dir_of(runs.find_checkpoint(cfg.init_from)))
    if chat is not None:
        checkpoint.save_chat(out, *chat)


# --- the loop ------------------------------------------------------------------------------------
def due(step: int, cfg: TrainConfig) -> tuple[bool, bool, bool]:
    """Whether `step` logs its loss, evaluates, saves the checkpoint."""
    is_log = step % cfg.log_every == 0 or step == cfg.max_steps
    is_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
    saved = is_eval if cfg.save_every == 0 else step % cfg.save_every == 0 or step == cfg.max_steps
    return is_log, is_eval, saved


@dataclass
class Trainer:
    """The loop and its parts (one step, an evaluation, a checkpoint), set up by _train. step and best_val
    move as it trains; the main process (rank 0) alone writes."""
    cfg: TrainConfig
    out: Path
    model: torch.nn.Module  # what is evaluated and saved
    train_model: torch.nn.Module  # what the steps call: compiled, in DDP under torchrun
    compiled: bool
    data: PretrainData | SFTData
    optimizer: torch.optim.Optimizer
    device: str
    rank: int
    world: int
    autocast: AbstractContextManager  # bf16 autocast, or nothing
    base_model: str | None  # what state.json names as the base model
    adapter: dict | None  # a MiniGLM LoRA run's adapter config
    tok_identity: dict | None
    step: int
    best_val: float

    @property
    def master(self) -> bool:
        return self.rank == 0

    def save(self, path: Path, with_optimizer: bool) -> None:
        st = {"step": self.step, "best_val_loss": self.best_val, "sampler": self.data.state_dict(), "rng": rng_state(),
              "stage": self.cfg.stage, "base_model": self.base_model, "tokenizer_identity": self.tok_identity}
        optimizer = self.optimizer if with_optimizer else None
        if self.cfg.hf:
            hf.save_checkpoint(path, self.model, st, optimizer)
            return
        adapter = None if self.adapter is None else {"weights": lora.adapter_state(self.model), "config": self.adapter}
        checkpoint.save_checkpoint(path, self.model, self.model.config, st, optimizer, adapter)

    def evaluate(self) -> dict:
        model, world, rank = self.model, self.world, self.rank
        model.eval()
        losses = []
        with torch.no_grad(), self.autocast:
            for batch in self.data.eval_batches(self.cfg.eval_batches, self.cfg.batch_size * world):
                losses.append(model(**{k: to_device(v[rank::world], self.device) for k, v in batch.items()})[1])
        model.train()
        val = all_mean(torch.stack(losses).mean().item() if losses else 0.0, world)
        result = {"val_loss": val}
        bpt = self.data.bytes_per_token()
        if bpt:
            result["val_bpb"] = val / math.log(2) / bpt
        return result

    def write_metrics(self, row: dict) -> None:
        if self.master:
            fileio.append_jsonl(self.out / "metrics.jsonl", row)

    def train_step(self, lr: float) -> tuple[torch.Tensor, int]:
        """One optimizer step on a global batch, grad_accum micro-batches on each process. Returns the loss,
        left on the device (no wait for the GPU at every step), and the tokens this process ran."""
        cfg, world, rank = self.cfg, self.world, self.rank
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        global_batch = self.data.next_batch(cfg.batch_size * cfg.grad_accum * world)
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(cfg.grad_accum):
            i = (micro * world + rank) * cfg.batch_size  # this process's slice of the global batch
            batch = {k: to_device(v[i:i + cfg.batch_size], self.device) for k, v in global_batch.items()}
            sync = nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else self.train_model.no_sync()
            with sync, self.autocast:
                _, loss = self.train_model(**batch)
                loss = loss / cfg.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
            tokens += batch["idx"].numel()  # tokens processed (SFT padding included: the compute is spent)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, tokens

    def mean_loss(self, loss_sum: torch.Tensor) -> float:
        """The step's loss, averaged over the processes; nan or inf stops the run."""
        loss = all_mean(loss_sum.item(), self.world)
        if not math.isfinite(loss):  # checked before anything is saved: the last good checkpoint stays
            raise Diverged(f"the loss became {loss} by step {self.step}: training stopped, the last good "
                           f"checkpoint in {self.out / 'ckpt'} is kept; lower lr (now {self.cfg.lr:g}) or raise "
                           "warmup_steps, then rerun")
        return loss

    def evaluation(self, probe, train_loss: float, tok_per_s: float, pbar) -> tuple[dict, float]:
        """An evaluation step: val loss (and the probe's numbers) logged and printed, the best weights so far
        saved. Returns the evaluation and the seconds the probe took (left out of tokens/s)."""
        ev, probe_s = self.evaluate(), 0.0
        if probe is not None and self.master:
            t_probe = time.perf_counter()
            self.model.eval()
            with torch.no_grad():
                ev.update(probe(self.model))
            self.model.train()
            probe_s = time.perf_counter() - t_probe
        self.write_metrics({"step": self.step, **ev})
        if self.master:
            pbar.write(f"step {self.step}/{self.cfg.max_steps}: train loss {train_loss:.4f}, "
                       + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()) + f", {tok_per_s:,.0f} tok/s")
        if ev["val_loss"] < self.best_val:
            self.best_val = ev["val_loss"]
            if self.master:
                self.save(self.out / "best", with_optimizer=False)
        return ev, probe_s

    def run(self, log, probe) -> dict:
        """Step to max_steps: log, evaluate and save as due. Ctrl-C stops at a step boundary, saved."""
        cfg, out, master = self.cfg, self.out, self.master
        live_bar = master and sys.stderr.isatty()  # a bar showing each step's loss: read every step only then
        # A live bar on a terminal; in logs (CI, nohup) only the eval lines.
        pbar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True,
                    disable=not live_bar) if master else None
        self.model.train()
        loss_avg, first_step = float("nan"), self.step
        t_start, tokens_run, summary = time.perf_counter(), 0, {}
        stop, interrupted = Interrupt(), False
        if self.step >= cfg.max_steps:  # a finished run, rerun: report where it stands
            if master:
                log(f"{out} already trained {self.step} of {cfg.max_steps} steps; raise max_steps to train on")
            summary.update(self.evaluate())
        try:
            stop.install()
            while self.step < cfg.max_steps:
                lr = lr_at(self.step, cfg)
                loss_sum, tokens = self.train_step(lr)
                tokens_run += tokens * self.world
                if self.compiled and self.step == first_step + 1 and master:
                    log(f"torch.compile: the first step took {time.perf_counter() - t_start:.1f}s (compiling)")
                elapsed = time.perf_counter() - t_start
                is_log, is_eval, saved = due(self.step, cfg)
                stopping = any_rank(stop.requested, self.world)
                if is_log or is_eval or saved or stopping:  # the same steps on every process (all_mean)
                    loss_avg = self.mean_loss(loss_sum)
                if master and is_log:
                    self.write_metrics({"step": self.step, "loss": loss_avg, "lr": lr,
                                        "tok_per_s": tokens_run / elapsed, "time": elapsed})
                if pbar is not None:
                    if live_bar:  # this process's loss
                        pbar.set_postfix(loss=f"{loss_sum.item():.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{tokens_run / elapsed:,.0f}")
                    pbar.update(1)
                if is_eval:
                    ev, probe_s = self.evaluation(probe, loss_avg, tokens_run / elapsed, pbar)
                    t_start += probe_s  # tokens/s counts training and val loss only
                    summary.update(ev)
                if master and saved:
                    self.save(out / "ckpt", with_optimizer=True)
                if stopping:  # Ctrl-C: stop here, at a step boundary
                    interrupted = True
                    if master:
                        pbar.close()
                        if not saved:
                            self.save(out / "ckpt", with_optimizer=True)
                        log(f"interrupted: saved a checkpoint at step {self.step} to {out / 'ckpt'}; rerun to resume")
                    break
            if self.world > 1:
                dist.barrier()  # leave together: a process gone early can abort its peer's gloo connection
        finally:
            stop.restore()
            if pbar is not None:
                pbar.close()
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()
        if interrupted or stop.requested:
            raise KeyboardInterrupt
        elapsed = time.perf_counter() - t_start
        summary.update({"steps": self.step, "seconds": elapsed, "tok_per_s": tokens_run / max(elapsed, 1e-9),
                        "best_val_loss": self.best_val, "params": self.model.num_params()})
        return summary


# --- train: the parts in order -------------------------------------------------------------------
def train(cfg: TrainConfig, log=print, probe: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train as cfg says; return the last evaluation and the run's totals. probe(model) -> {name: number}
    is called at each evaluation (on the main process, the model in eval mode, no grad); its numbers go
    into metrics.jsonl beside val_loss, and its time is left out of tokens/s.

    out_dir is checked (never an input: the data, the tokenizer, init_from's run unless resuming itself) and
    locked for the run's life: a second train on it is refused with one line. Under torchrun rank 0 alone
    writes, and holds the lock for the job; another job's rank 0 is refused, and torchrun stops its peers."""
    out = Path(cfg.out_dir)
    init = cfg.init_from if cfg.init_from != "scratch" and Path(cfg.init_from).exists() else None
    resume_self = init is not None and Path(init).resolve() == out.resolve()
    inputs = [cfg.data, *(runs.run_inputs(init) if init and not resume_self else []),
              *([cfg.tokenizer] if cfg.tokenizer and Path(cfg.tokenizer).exists() else [])]
    threads = torch.get_num_threads()
    try:
        with fileio.output_lock(out, inputs, writer=int(os.environ.get("RANK", 0)) == 0):
            return _train(cfg, log, probe)
    finally:  # `threads` is this run's setting: a caller's process (the demo, a notebook) keeps its own
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, log, probe) -> dict:
    """The parts in order: the device; where the run starts (its own checkpoint, init_from or scratch), its
    tokenizer and its model; the data; the optimizer; then the loop (Trainer.run)."""
    if not cfg.data:
        raise UserError("no data: set data = \"FOLDER\" in the config or --set data=FOLDER")
    device, rank, world, dtype = setup_device(cfg)
    cfg.device = device  # config.toml records the device used, not "auto"
    out, master = Path(cfg.out_dir), rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    resume = find_resume(out)
    meta = load_meta(cfg.data)
    tok_identity, tok = run_tokenizer(cfg, out, meta, resume, master)
    model, base_model = model_source(cfg, out, resume, meta)
    adapter = add_adapter(cfg, model, resume)
    model.to(device)
    data = (PretrainData if cfg.stage == "pretrain" else SFTData)(cfg.data, model.config.block_size, cfg.seed)
    optimizer = make_optimizer(model, cfg, device_type)
    step, best_val = 0, float("inf")
    if resume is not None:
        step, best_val = restore(resume, optimizer, data, out, master, log)
    elif master:
        start_run(cfg, out, tok)
    if master:
        save_config(cfg, out / "config.toml")
        write_chat_info(cfg, out, meta)

    # What the steps call: compiled (the first steps compile; on a GPU then fewer, fused kernels a step), in DDP
    compiled = cfg.compile is True or (cfg.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model) if compiled else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    return Trainer(cfg, out, model, train_model, compiled, data, optimizer, device, rank, world, autocast,
                   base_model, adapter, tok_identity, step, best_val).run(log, probe)
