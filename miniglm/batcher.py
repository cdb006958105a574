"""Continuous batching for the server: requests join and leave the running batch between decode steps.

All rows share one KV cache whose positions are right-aligned: a row that joins is prefilled alone,
then its keys are copied in at the end of the filled positions with padding before them (masked out,
and its position ids count only its own tokens), so it decodes exactly as it would alone. A row that
finishes, or whose client went away, leaves at the next step.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from miniglm.engine import SamplingParams, find_stop, sample_next
from miniglm.model import KVCache, MiniGLM
from miniglm.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[dict], None]  # receives {"delta": text} ... then {"done": True, "finish_reason": ...}
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    # decoding state, owned by the batcher thread
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None


class Batcher:
    def __init__(self, model: MiniGLM, tokenizer: Tokenizer, device: str = "cpu", max_batch: int = 32):
        self.model, self.tokenizer, self.device, self.max_batch = model.eval(), tokenizer, device, max_batch
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # last logits of each active row, (B, V)
        self.cond = threading.Condition()
        self.running = True
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="miniglm-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()
        return job

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join(timeout=10)

    # --- the loop (batcher thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.waiting and not self.active:
                    self.cond.wait()
                if not self.running:
                    return
                joining = self.waiting[:max(0, self.max_batch - len(self.active))]
                self.waiting = self.waiting[len(joining):]
            try:
                with torch.inference_mode():
                    for r in joining:
                        if not r.cancelled:
                            self._join(r)
                    if self.active:
                        self._step()
            except Exception as e:  # never let one bad step kill the server: fail the rows in flight
                for r in self.active:
                    r.on_event({"error": f"{type(e).__name__}: {e}"})
                self.active, self.cache, self.logits = [], None, None

    def _join(self, r: Job) -> None:
        r.decoder = StreamDecoder(self.tokenizer, r.params.skip_special_tokens)
        if r.params.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        if r.params.repetition_penalty != 1.0:
            r.history = torch.tensor([r.prompt], device=self.device)
        alone = KVCache(self.model.config, 1, len(r.prompt), device=self.device, dtype=self._dtype())
        logits, _ = self.model(torch.tensor([r.prompt], device=self.device), cache=alone)
        if self.cache is None:
            self.cache = KVCache(self.model.config, 1, self.model.config.block_size, device=self.device,
                                 dtype=self._dtype())
            self.cache.k[:, :, :, :len(r.prompt)] = alone.k
            self.cache.v[:, :, :, :len(r.prompt)] = alone.v
            self.cache.pos = len(r.prompt)
            self.active, self.logits = [r], logits[:, -1]
            return
        P, S = len(r.prompt), self.cache.pos
        if P > S:  # make room on the left: every row gets P - S more padding
            self._shift_right(P - S)
            S = P
        c = self.cache
        extra = KVCache(self.model.config, 1, c.max_len, device=self.device, dtype=self._dtype())
        extra.mask[:, :S - P] = False
        extra.n_pad[:] = S - P
        c.padded = c.padded or S > P
        extra.k[:, :, :, S - P:S] = alone.k
        extra.v[:, :, :, S - P:S] = alone.v
        c.k, c.v = torch.cat([c.k, extra.k], 1), torch.cat([c.v, extra.v], 1)
        c.mask, c.n_pad = torch.cat([c.mask, extra.mask]), torch.cat([c.n_pad, extra.n_pad])
        self.active.append(r)
        self.logits = torch.cat([self.logits, logits[:, -1]])

    def _shift_right(self, n: int) -> None:
        c = self.cache
        if c.pos + n > c.max_len:
            raise RuntimeError("no room in the cache to align a joining request")
        c.k = torch.roll(c.k, n, dims=3)
        c.v = torch.roll(c.v, n, dims=3)
        c.mask = torch.roll(c.mask, n, dims=1)
        c.mask[:, :n] = False
        c.n_pad += n
        c.pos += n
        c.padded = True

    def _compact(self) -> None:
        """When the shared positions run out, drop the leading columns that are padding in every row."""
        c = self.cache
        n = int(c.n_pad.min())
        if n == 0:
            return
        c.k = torch.roll(c.k, -n, dims=3)
        c.v = torch.roll(c.v, -n, dims=3)
        c.mask = torch.roll(c.mask, -n, dims=1)
        c.mask[:, c.max_len - n:] = True
        c.n_pad -= n
        c.pos -= n

    def _dtype(self) -> torch.dtype:
        return self.model.embeddings.weight.dtype

    def _step(self) -> None:
        next_ids = []
        for i, r in enumerate(self.active):
            t = int(sample_next(self.logits[i:i + 1], r.params, r.history, r.generator)[0])
            next_ids.append(t)
        keep = []
        for r, t in zip(self.active, next_ids, strict=True):
            reason = self._advance(r, t)
            if reason is None:
                keep.append(True)
            else:
                keep.append(False)
                r.on_event({"done": True, "finish_reason": reason, "completion_tokens": len(r.ids),
                            "prompt_tokens": len(r.prompt), "text": r.text})
        self.steps += 1
        if not all(keep):
            rows = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
            self.active = [r for r, k in zip(self.active, keep, strict=True) if k]
            next_ids = [t for t, k in zip(next_ids, keep, strict=True) if k]
            if not self.active:
                self.cache, self.logits = None, None
                return
            c = self.cache
            c.k, c.v = c.k.index_select(1, rows), c.v.index_select(1, rows)
            c.mask, c.n_pad = c.mask.index_select(0, rows), c.n_pad.index_select(0, rows)
        if self.cache.pos >= self.cache.max_len:
            self._compact()
        x = torch.tensor(next_ids, device=self.device)[:, None]
        logits, _ = self.model(x, cache=self.cache)
        self.logits = logits[:, -1]
        for r, t in zip(self.active, next_ids, strict=True):
            if r.history is not None:
                r.history = torch.cat([r.history, torch.tensor([[t]], device=self.device)], 1)

    def _advance(self, r: Job, t: int) -> str | None:
        """Take one sampled token for a row: emit text, or say why the row ends."""
        if r.cancelled:
            return "cancelled"
        if t in r.params.stop_ids:
            return "stop"
        r.ids.append(t)
        r.text += r.decoder.push(t)
        cut = find_stop(r.text, r.params.stop_strings)
        if cut is not None:
            r.text = r.text[:cut]
            self._emit(r, len(r.text))
            return "stop"
        hold = max((len(s) for s in r.params.stop_strings), default=1) - 1
        finished = len(r.ids) >= r.params.max_new_tokens
        real = len(r.prompt) + len(r.ids)
        if real >= self.model.config.block_size:
            finished = True
        if finished:
            r.text += r.decoder.flush()
            cut = find_stop(r.text, r.params.stop_strings)
            if cut is not None:
                r.text = r.text[:cut]
            self._emit(r, len(r.text))
            return "stop" if cut is not None else "length"
        self._emit(r, len(r.text) - hold)
        return None

    @staticmethod
    def _emit(r: Job, upto: int) -> None:
        if upto > r.sent:
            r.on_event({"delta": r.text[r.sent:upto]})
            r.sent = upto

