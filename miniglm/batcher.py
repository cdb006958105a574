"""Continuous batching for the server: requests join and leave the running batch between decode steps.

All rows share one KV cache whose positions are right-aligned: a row that joins is prefilled alone,
then its keys are copied in at the end of the filled positions with padding before them (masked out,
and its position ids count only its own tokens), so it decodes exactly as it would alone. A row that
finishes, or whose client went away, leaves at the next step.

Each row's text goes through engine.Row, the same decode state Engine uses, and its tokens through the
same TextMask (never invalid UTF-8) and, with a seed, a generator of its own. A row that fails (its
sampling, its prefill, its client's callback) ends alone with an error event; the others go on. A
failure of the batch's forward pass ends every row in flight. Requests past max_batch wait, in order,
until a row leaves.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from miniglm.devices import model_device
from miniglm.engine import Row, SamplingParams, TextMask, mask_for, row_generator, sample_next
from miniglm.model import KVCache, MiniGLM
from miniglm.tokenizer import Tokenizer


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    # receives {"delta": text} ... then {"done": True, "finish_reason": ...}, or {"error": message, "status": ...}
    on_event: Callable[[dict], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    # the server's per-request hooks: logit_bias {id: bias} is added to this row's logits before sampling;
    # top_logprobs (0..20, None: off) sends {"logprob": (id, logprob, [(id, logprob), ...])} before each
    # new token's text: the model's own distribution (log_softmax of its logits, before temperature, bias,
    # penalty and top-k/top-p), as vLLM reports by default
    logit_bias: dict[int, float] | None = None
    top_logprobs: int | None = None
    # decoding state, owned by the batcher thread
    row: Row | None = None
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) on the device

    def advance(self, t: int, logprobs: torch.Tensor | None, block_size: int) -> None:
        """Take one sampled token: send the text that is safe to send, and say when the row ends."""
        row = self.row
        if self.cancelled:
            row.done, row.finish_reason = True, "cancelled"  # nobody reads this row any more
        elif t in self.params.stop_ids:
            row.finish("stop")
        else:
            if logprobs is not None:  # the token's, then its top alternatives' (a stop token has none)
                top = torch.topk(logprobs, self.top_logprobs) if self.top_logprobs else None
                self.on_event({"logprob": (t, logprobs[t].item(), [] if top is None else list(
                    zip(top.indices.tolist(), top.values.tolist(), strict=True)))})
            row.push(t)
            if len(row.prompt) + len(row.ids) >= block_size:
                row.finish("length")
        if chunk := row.pending():
            self.on_event({"delta": chunk})
        if row.done:
            self.on_event({"done": True, "finish_reason": row.finish_reason, "completion_tokens": len(row.ids),
                           "prompt_tokens": len(row.prompt), "text": row.text})


class SharedCache:
    """The KV cache of the rows in flight, right-aligned: every row's keys end at the same position, with
    padding before a shorter row's (masked out). `store` has room for more rows than are in flight, grown
    by doubling; `cache`, the one the model steps through, views the store's first rows (live)."""

    def __init__(self, model: MiniGLM, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.device = model_device(model)
        self.cache: KVCache | None = None  # the rows in flight: views of the store's first rows
        self.store: KVCache | None = None  # room for more rows than are in flight

    def clear(self) -> None:
        self.cache, self.store = None, None

    def add(self, alone: KVCache, P: int, B: int) -> None:
        """Row B's prompt keys (prefilled alone, P positions) copied in, ending at the shared position: the
        rows in flight get more padding on the left when P is past it. Raises before changing anything
        when there is no room to align it."""
        if self.cache is None:
            self.store = self._new_cache(1)
            self.cache = self._new_cache(0)
            self.cache.pos = P
        elif P > self.cache.pos:  # make room on the left: every row gets P - pos more padding
            self._shift_right(P - self.cache.pos)
        if B == self.store.k.size(1):  # full: twice the rows (copying the live ones), as a list grows
            bigger = self._new_cache(min(self.max_batch, 2 * B))
            bigger.k[:, :B], bigger.v[:, :B] = self.cache.k, self.cache.v
            bigger.mask[:B], bigger.n_pad[:B] = self.cache.mask, self.cache.n_pad
            self.store = bigger
        S, s = self.cache.pos, self.store  # the new row: padding, then its prompt's keys ending at S
        s.k[:, B, :, S - P:S], s.v[:, B, :, S - P:S] = alone.k[:, 0], alone.v[:, 0]
        s.mask[B], s.mask[B, :S - P], s.n_pad[B] = True, False, S - P
        self.cache.padded = self.cache.padded or S > P
        self.live(B + 1)

    def new_alone(self, P: int) -> KVCache:
        """A cache for one prompt of P tokens, prefilled before it joins."""
        return KVCache(self.model.config, 1, P, device=self.device, dtype=self._dtype())

    def _new_cache(self, rows: int) -> KVCache:
        return KVCache(self.model.config, rows, self.model.config.block_size, device=self.device, dtype=self._dtype())

    def live(self, n: int) -> None:
        """The cache the model steps through: views of the store's first n rows, the rows in flight. A row
        joins or leaves by copying one row in the store, not the whole cache."""
        c, s = self.cache, self.store
        c.k, c.v, c.mask, c.n_pad = s.k[:, :n], s.v[:, :n], s.mask[:n], s.n_pad[:n]

    def move(self, src: int, dst: int) -> None:
        """Row src's keys, mask and padding into slot dst of the store."""
        s = self.store
        for t in (s.k, s.v):
            t[:, dst] = t[:, src]
        s.mask[dst], s.n_pad[dst] = s.mask[src], s.n_pad[src]

    def _shift_right(self, n: int) -> None:
        c = self.cache
        if c.pos + n > c.max_len:
            raise RuntimeError("no room in the cache to align a joining request")
        self._roll(n)
        c.mask[:, :n] = False
        c.padded = True

    def compact_if_full(self) -> None:
        """When the shared positions run out, drop the leading columns that are padding in every row."""
        c = self.cache
        if c.pos < c.max_len:
            return
        n = int(c.n_pad.min())
        if n == 0:
            return
        self._roll(-n)
        c.mask[:, c.max_len - n:] = True

    def _roll(self, n: int) -> None:
        """Every row's positions n to the right (n < 0: left), in place in the store; the caller sets the
        mask of the columns that came round."""
        c = self.cache
        for t in (c.k, c.v):
            t.copy_(torch.roll(t, n, dims=3))
        c.mask.copy_(torch.roll(c.mask, n, dims=1))
        c.n_pad += n
        c.pos += n

    def _dtype(self) -> torch.dtype:
        return self.model.embeddings.weight.dtype


def bias_and_logprobs(jobs: list[Job], logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The server's hooks, before sampling: the log-probabilities of the rows that asked for them (by row,
    from the model's logits), then each row's logit_bias added to its logits (a copy: the step's own
    output may be a static buffer). Returns the logits to sample from and the log-probabilities."""
    want = [i for i, r in enumerate(jobs) if r.top_logprobs is not None]
    logprobs = dict(zip(want, torch.log_softmax(logits[want].float(), -1), strict=True)) if want else {}
    biased = [i for i, r in enumerate(jobs) if r.bias is not None]
    if biased:
        logits = logits.float().clone()
        for i in biased:
            ids, values = jobs[i].bias
            logits[i, ids] += values
    return logits, logprobs


def sample_together(jobs: list[Job], logits: torch.Tensor, text_mask: TextMask, device) -> dict[int, int]:
    """The tokens of the rows that can sample together, by row: rows with the same settings and no
    repetition penalty (which needs a row's own history) share one sample_next call, as a batch does
    in Engine; a row with a seed brings its own draw from its own generator. If that fails (e.g. one
    row's logits are NaN), each samples alone, so that row fails alone."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(jobs):
        p = r.params
        if p.repetition_penalty == 1:
            key = ("greedy",) if p.temperature <= 0 else (p.temperature, p.top_k, p.top_p)
            groups.setdefault(key, []).append(i)
    tokens: dict[int, int] = {}
    for rows in groups.values():
        group_logits = logits if len(rows) == len(jobs) else logits[rows]
        params = jobs[rows[0]].params
        try:
            uniforms = None if params.temperature <= 0 else torch.cat(
                [torch.rand(1, generator=jobs[i].generator, device=device) for i in rows])
            mask = text_mask.rows([jobs[i].row.utf8 for i in rows], group_logits)
            tokens.update(zip(rows, sample_next(group_logits, params, None, None, uniforms, mask).tolist(),
                              strict=True))
        except Exception:
            pass
    return tokens


class Batcher:
    """on_step, if given, is called by the batcher's loop after each step's events (and after events
    outside a step: a refused submit, a shutdown), so a listener can take them in one hand-over per step.

    thread=True runs the loop in a thread of its own; thread=False leaves it to the caller's run(), which
    `miniglm serve` calls on the main thread. Why it matters: torch's OpenMP (libgomp) keeps a pool of
    worker threads per thread that has run a parallel op, and once the process has more of them than
    cores, every parallel op wakes its workers through the kernel (~0.2 ms on the 2-core machine, against
    ~0.01 ms in the main thread alone). The model was loaded on the main thread, so the decoding belongs
    there too: one pool, and decoding at the engine's speed."""

    def __init__(self, model: MiniGLM, tokenizer: Tokenizer, max_batch: int = 32,
                 on_step: Callable[[], None] | None = None, thread: bool = True,
                 step: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None):
        # the model as it is handed over (an engine's decoding copy, in eval mode), on its own device
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = model_device(model)
        self.text_mask = mask_for(tokenizer, model.config.vocab_size)  # as Engine's: the same tokens allowed
        # one token per row (B,) through the cache -> logits (B, V): Engine.forward_step for an engine's
        # decoding copy (DecodeStep's fewer ops), else the model's forward
        self.forward_step = step or (lambda tokens, cache: self.model(tokens[:, None], cache=cache)[0][:, -1])
        self.on_step = on_step or (lambda: None)
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.kv = SharedCache(model, max_batch)
        self.logits: torch.Tensor | None = None  # last logits of each active row, (B, V)
        self.cond = threading.Condition()
        self.running = True
        self.steps = 0
        self.finished = threading.Event()
        if thread:
            threading.Thread(target=self.run, name="miniglm-batcher", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self.cond:
            if not self.running:
                _fail(job, "the server is shutting down", 503)
                self.on_step()
                return job
            self.waiting.append(job)
            self.cond.notify()
        return job

    def stop(self, timeout: float = 10) -> None:
        """End the loop, waiting up to timeout seconds for it; every row in flight or waiting gets an error
        event (503). Call it from any thread but the loop's."""
        with self.cond:
            self.running = False
            self.cond.notify()
        self.finished.wait(timeout)

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Decode until stop(): in the batcher's thread, or in the caller's (thread=False)."""
        try:
            self._loop()
        finally:
            self.finished.set()

    def _loop(self) -> None:
        while (joining := self._next_joining()) is not None:
            with torch.inference_mode():
                for r in joining:
                    if r.cancelled:
                        continue
                    try:
                        self._join(r)
                    except Exception as e:  # this request alone fails (the shared cache is not touched yet)
                        _fail(r, f"{type(e).__name__}: {e}")
                try:
                    if self.active:
                        self._step()
                except Exception as e:  # the batch's forward pass failed: fail the rows in flight, go on
                    for r in self.active:
                        _fail(r, f"{type(e).__name__}: {e}")
                    self.active, self.logits = [], None
                    self.kv.clear()
            self.on_step()

    def _next_joining(self) -> list[Job] | None:
        """Wait for work: the waiting requests that fit in the batch now, or None once stopped (every row
        in flight or waiting then gets its error event)."""
        with self.cond:
            while self.running and not self.waiting and not self.active:
                self.cond.wait()
            if not self.running:
                for r in self.active + self.waiting:
                    _fail(r, "the server is shutting down", 503)
                self.active, self.waiting, self.logits = [], [], None
                self.kv.clear()
                self.on_step()
                return None
            joining = self.waiting[:max(0, self.max_batch - len(self.active))]
            self.waiting = self.waiting[len(joining):]
            return joining

    def _join(self, r: Job) -> None:
        r.row = Row(r.prompt, r.params, self.tokenizer, mask=self.text_mask)
        if r.params.seed is not None:
            r.generator = row_generator(r.params.seed, r.prompt, self.device)  # as Engine's: the same answer
        if r.params.repetition_penalty != 1.0:
            r.history = torch.tensor([r.prompt], device=self.device)
        if r.logit_bias:
            r.bias = (torch.tensor(list(r.logit_bias), device=self.device),
                      torch.tensor(list(r.logit_bias.values()), device=self.device))
        alone = self.kv.new_alone(len(r.prompt))
        logits, _ = self.model(torch.tensor([r.prompt], device=self.device), cache=alone)
        B = len(self.active)
        self.kv.add(alone, len(r.prompt), B)
        self.active.append(r)
        self.logits = logits[:, -1] if B == 0 else torch.cat([self.logits, logits[:, -1]])

    def _leave(self, keep: list[bool], next_ids: list[int]) -> list[int]:
        """Drop the rows not kept: the last live row moves into each freed slot. Returns the kept rows'
        next tokens, in the rows' new order."""
        n, i = len(self.active), 0
        while i < n:
            if keep[i]:
                i += 1
                continue
            n -= 1
            if i != n:  # the last live row takes slot i (checked again: it may be leaving too)
                self.kv.move(n, i)
                self.active[i], next_ids[i], keep[i] = self.active[n], next_ids[n], keep[n]
        del self.active[n:], next_ids[n:]
        self.kv.live(n)
        return next_ids

    def _step(self) -> None:
        next_ids, keep = [], []
        self.logits, logprobs = bias_and_logprobs(self.active, self.logits)
        together = sample_together(self.active, self.logits, self.text_mask, self.device)
        for i, r in enumerate(self.active):
            try:  # the others sample alone, each from its own generator: a row that fails leaves the rest as they are
                if i in together:
                    t = together[i]
                else:
                    logits = self.logits[i:i + 1]
                    mask = self.text_mask.rows([r.row.utf8], logits)
                    t = sample_next(logits, r.params, r.history, r.generator, mask=mask).item()
                r.advance(t, logprobs.get(i), self.model.config.block_size)
            except Exception as e:
                _fail(r, f"{type(e).__name__}: {e}")
                r.row.done, t = True, 0
            next_ids.append(t)
            keep.append(not r.row.done)
        self.steps += 1
        if not all(keep):
            next_ids = self._leave(keep, next_ids)
            if not self.active:
                self.logits = None
                self.kv.clear()
                return
        self.kv.compact_if_full()
        self.logits = self.forward_step(torch.tensor(next_ids, device=self.device), self.kv.cache)
        for r, t in zip(self.active, next_ids, strict=True):
            if r.history is not None:
                r.history = torch.cat([r.history, torch.tensor([[t]], device=self.device)], 1)


def _fail(r: Job, message: str, status: int = 500) -> None:
    try:
        r.on_event({"error": message, "status": status})
    except Exception:  # the client's side is gone (its event loop closed): nothing left to tell
        pass
