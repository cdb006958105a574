"""Generation: one prefill, then one token per step through a preallocated KV cache.

A batch of prompts is left-padded (an attention mask keeps padding out, positions count real tokens)
and each sequence stops on its own: at a stop token or a stop string, neither of which is returned.
Streaming goes through the StreamDecoder, so a chunk never holds half a character.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from miniglm.fileio import UserError
from miniglm.model import KVCache, MiniGLM
from miniglm.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    fit_new_tokens: bool = False  # cap each row's new tokens at the room its prompt leaves (else refuse)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already in the sequence
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: int | None = None
    trim_prompt: bool = False  # a prompt past the context: keep its end instead of refusing it
    skip_special_tokens: bool = True  # leave control tokens (<|end|>, ...) out of the text, as vLLM does


@dataclass
class Completion:
    ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int = 0
    capped: bool = False  # fewer new tokens allowed than asked, to fit the context


@dataclass
class _Row:
    """Per-sequence decoding state."""

    prompt: list[int]
    max_new: int = 0  # this row's limit: max_new_tokens, or less where the context leaves less room
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str = "length"
    cut: bool = False  # ended by a stop string (the text after it is dropped)


def sample_next(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). history (B, S) holds the ids seen so far, for the repetition penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class DecodeLinear(torch.nn.Module):
    """One or more nn.Linear layers of the same input as one product (fewer, wider products), with the
    weight kept in both layouts: a single row (batch-1 decoding) multiplies fastest by the transposed
    (in, out) copy on CPU, several rows by the usual (out, in) one (bench/decode.py measures both)."""

    def __init__(self, *linears: torch.nn.Linear):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight_t = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False)
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                      requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.size(-1):  # one row
            y = x @ self.weight_t
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def for_decoding(model: MiniGLM) -> MiniGLM:
    """A copy of the model for CPU decoding (the caller's model is left as it is): llama's q/k/v and
    gate/up projections fused, every linear layer a DecodeLinear."""
    from miniglm.model import LlamaAttention, LlamaMLP

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            module.qkv_proj = DecodeLinear(module.q_proj, module.k_proj, module.v_proj)
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, LlamaMLP):
            module.gate_up_proj = DecodeLinear(module.gate_proj, module.up_proj)
            del module.gate_proj, module.up_proj
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, DecodeLinear(child))
    return model


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one (B, L) batch padded on the left, so every row's next token is at the end; and
    the attention mask (1 = a real token)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return idx, mask


class Engine:
    def __init__(self, model: MiniGLM, tokenizer: Tokenizer, device: str = "cpu", int8: bool = False,
                 transposed: bool = True):
        """transposed: decode with DecodeLinear layers on CPU (same logits, faster).
        int8: weight-only dynamic int8 quantization of the linear layers (CPU). Decoding a small model
        on a CPU streams every weight once per token, so a quarter of the bytes is ~2x the speed; the
        logits move slightly, so greedy output may differ from fp32."""
        model = model.eval().to(device)
        if transposed and not int8 and device == "cpu":
            model = for_decoding(model)
        if int8:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    def _fit(self, ids: list[int], params: SamplingParams) -> _Row:
        """A row for one prompt: its new tokens capped at the context's room (fit_new_tokens), or its
        prompt's start dropped (trim_prompt), or an error. Depends on the prompt alone, never on its batch."""
        block, new = self.model.config.block_size, params.max_new_tokens
        room = block - len(ids)
        if params.fit_new_tokens and 0 < room < new:
            return _Row(ids, room)
        if len(ids) + new <= block:
            return _Row(ids, new)
        if params.trim_prompt:
            keep = block - min(new, block // 2)  # leave room for an answer, at most half the context
            return _Row(ids[-keep:], min(new, block - keep))
        raise UserError(f"prompt of {len(ids)} tokens + {new} new tokens is past the context "
                        f"of {block}; shorten it, lower max_new_tokens, or trim the prompt")

    def start(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[_Row]:
        if any(not p for p in prompts):
            raise UserError("an empty prompt: give at least one token")
        return [self._fit(list(p), params) for p in prompts]

    @torch.inference_mode()
    def steps(self, rows: list[_Row], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        """Decode a batch; after each step yield the (row, token) pairs that are new and not stop tokens.
        A caller may mark a row done between steps (a stop string); decoding ends when all are."""
        idx, mask = left_pad([r.prompt for r in rows], self.tokenizer.pad_id)
        B, L = idx.shape
        padded = bool((mask == 0).any())
        steps = max(r.max_new for r in rows)
        cache = KVCache(self.model.config, B, L + steps, device=self.device,
                        dtype=self.model.embeddings.weight.dtype)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        idx = idx.to(self.device)
        logits, _ = self.model(idx, attention_mask=mask.to(self.device) if padded else None, cache=cache)
        history = idx if params.repetition_penalty != 1.0 else None
        stop_ids = set(params.stop_ids)
        for _ in range(steps):
            nxt = sample_next(logits[:, -1], params, history, generator)
            yield self._accept(rows, nxt.tolist(), stop_ids)
            if all(r.done for r in rows):
                return
            if history is not None:
                history = torch.cat([history, nxt[:, None]], dim=1)
            logits, _ = self.model(nxt[:, None], cache=cache)

    @staticmethod
    def _accept(rows: list[_Row], tokens: list[int], stop_ids: set[int]) -> list[tuple[int, int]]:
        """One step's token per row: a stop token ends its row (and is not kept); done rows are skipped."""
        new = []
        for i, t in enumerate(tokens):
            r = rows[i]
            if r.done:
                continue
            if t in stop_ids:
                r.done, r.finish_reason = True, "stop"
                continue
            r.ids.append(t)
            new.append((i, t))
            if len(r.ids) >= r.max_new:
                r.done = True
        return new

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete a batch of tokenised prompts (left padding, per-sequence stopping)."""
        rows = self.start(prompts, params)
        decoders = [StreamDecoder(self.tokenizer, params.skip_special_tokens) for _ in rows]
        for new in self.steps(rows, params):
            for i, t in new:
                rows[i].text += decoders[i].push(t)
                self._check_stop_string(rows[i], params)
        for r, dec in zip(rows, decoders, strict=True):
            if not r.cut:
                r.text += dec.flush()
                self._check_stop_string(r, params)
        return [Completion(r.ids, r.text, r.finish_reason, len(r.prompt), r.max_new < params.max_new_tokens)
                for r in rows]

    @staticmethod
    def _check_stop_string(r: _Row, params: SamplingParams) -> None:
        cut = find_stop(r.text, params.stop_strings)
        if cut is not None:
            r.text, r.done, r.finish_reason, r.cut = r.text[:cut], True, "stop", True

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text chunks of one completion as they are decoded; never half a character, never a stop string."""
        rows = self.start([prompt], params)
        r, decoder, sent = rows[0], StreamDecoder(self.tokenizer, params.skip_special_tokens), 0
        hold = max((len(s) for s in params.stop_strings), default=1) - 1  # a stop string may still be forming
        for new in self.steps(rows, params):
            for _, t in new:
                r.text += decoder.push(t)
            self._check_stop_string(r, params)
            end = len(r.text) if r.done else len(r.text) - hold
            if end > sent:
                yield r.text[sent:end]
                sent = end
        if not r.cut:
            r.text += decoder.flush()
            self._check_stop_string(r, params)
            if len(r.text) > sent:
                yield r.text[sent:]


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
