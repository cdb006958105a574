"""Generation: one prefill, then one token per step through a preallocated KV cache.

A batch of prompts is left-padded (an attention mask keeps padding out, positions count real tokens)
and each sequence stops on its own: at a stop token or a stop string, neither of which is returned.
Streaming goes through the StreamDecoder, so a chunk never holds half a character.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, dataclass, field

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

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Check every setting's type and range (the CLI and the server both call this); numbers become
        float or int. Out of range is refused, never clamped. Raises SamplingError naming the field."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise SamplingError(name, rule)

        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", "must be an integer >= 0")
        need(_is_finite(self.temperature) and 0 <= self.temperature <= 2, "temperature",
             "must be a number from 0 (greedy) to 2")
        top = vocab_size if vocab_size is not None else MAX_TOP_K
        need(_is_int(self.top_k) and 0 <= self.top_k <= top, "top_k", f"must be an integer from 0 (off) to {top}")
        need(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number above 0 and at most 1")
        need(_is_finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
             "must be a number above 0 and at most 10 (1 = off)")
        need(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**63), "seed",
             "must be an integer that fits in 64 bits")
        stops = self.stop_strings
        need(isinstance(stops, (list, tuple)) and all(isinstance(x, str) for x in stops), "stop_strings",
             "must be a list of strings")
        need(len(stops) <= MAX_STOP_STRINGS and all(len(x) <= MAX_STOP_CHARS for x in stops), "stop_strings",
             f"may hold at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        return self


MAX_TOP_K = 1_000_000  # when the vocabulary is not known yet (the CLI before loading a run)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


class SamplingError(UserError):
    """A sampling setting out of range. `field` is SamplingParams' name for it: the CLI reports it as
    its flag, the server as its API parameter."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field} {rule}")
        self.field, self.rule = field, rule


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    # a huge int is finite but float(v) would overflow: compare it as an int
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


@dataclass
class Completion:
    ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int = 0
    capped: bool = False  # fewer new tokens allowed than asked, to fit the context


@dataclass
class Row:
    """One sequence's decode state, shared by Engine (generate, stream) and the server's Batcher: the
    new ids, their text (never half a character), whether and why the row ended, and how much of the
    text has been handed out. A stop string ends the row and is cut from the text; while a row runs,
    the last len(longest stop) - 1 characters are held back, as they may be the start of one."""

    prompt: list[int]
    params: SamplingParams
    tokenizer: InitVar[Tokenizer]
    max_new: int | None = None  # this row's limit: params.max_new_tokens, or less where the context has less room
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # text[:sent] has been handed out
    done: bool = False
    finish_reason: str = "length"  # "stop" (a stop token or string), "length", or the caller's reason
    cut: bool = False  # ended by a stop string (the text after it is dropped)
    decoder: StreamDecoder = field(init=False, repr=False)

    def __post_init__(self, tokenizer: Tokenizer) -> None:
        self.decoder = StreamDecoder(tokenizer, self.params.skip_special_tokens)
        if self.max_new is None:
            self.max_new = self.params.max_new_tokens

    def push(self, token: int) -> None:
        """Take one new token (not a stop token); the row ends at a stop string or at max_new_tokens."""
        self.ids.append(token)
        self.text += self.decoder.push(token)
        self._cut_at_stop()
        if len(self.ids) >= self.max_new:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row (a stop token, the length limit, ...): the decoder's held-back bytes become text."""
        if self.done:
            return
        self.done, self.finish_reason = True, reason
        self.text += self.decoder.flush()
        self._cut_at_stop()

    def _cut_at_stop(self) -> None:
        cut = find_stop(self.text, self.params.stop_strings)
        if cut is not None:
            self.text, self.done, self.finish_reason, self.cut = self.text[:cut], True, "stop", True

    def pending(self) -> str:
        """The text not handed out yet that is safe to hand out (all of it once the row is done)."""
        hold = 0 if self.done else max((len(s) for s in self.params.stop_strings), default=1) - 1
        end = len(self.text) - hold
        if end <= self.sent:
            return ""
        chunk, self.sent = self.text[self.sent:end], end
        return chunk


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
    (in, out) copy on CPU, several rows by the usual (out, in) one (bench/decode.py measures both).
    transposed=False keeps the (out, in) layout alone."""

    def __init__(self, *linears: torch.nn.Linear, transposed: bool = True):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight_t = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False) if transposed else None
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                      requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None and x.numel() == x.size(-1):  # one row
            y = x @ self.weight_t
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


# The transposed copy pays on small models' matrices; past ~50M parameters (SmolLM2-135M) one row is
# memory-bound in either layout (the same tokens/s) and the copy would double the weights' memory.
TRANSPOSED_MAX_PARAMS = 50_000_000


def for_decoding(model: MiniGLM) -> MiniGLM:
    """A copy of the model for CPU decoding (the caller's model is left as it is): llama's q/k/v and
    gate/up projections fused, every linear layer a DecodeLinear (with transposed copies on small models)."""
    from miniglm.model import LlamaAttention, LlamaMLP

    transposed = sum(p.numel() for p in model.parameters()) <= TRANSPOSED_MAX_PARAMS
    # The linear layers are rebuilt below from their weights: the copy shares them rather than copying
    # them first (not a tied embedding's, which the copy keeps). Halves the peak memory of a 135M model.
    kept = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    memo = {id(p): p for m in model.modules() if type(m) is torch.nn.Linear
            for p in m.parameters(recurse=False) if id(p) not in kept}
    model = copy.deepcopy(model, memo)
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            module.qkv_proj = DecodeLinear(module.q_proj, module.k_proj, module.v_proj, transposed=transposed)
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, LlamaMLP):
            module.gate_up_proj = DecodeLinear(module.gate_proj, module.up_proj, transposed=transposed)
            del module.gate_proj, module.up_proj
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, DecodeLinear(child, transposed=transposed))
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

    def _fit(self, ids: list[int], params: SamplingParams) -> Row:
        """A row for one prompt: its new tokens capped at the context's room (fit_new_tokens), or its
        prompt's start dropped (trim_prompt), or an error. Depends on the prompt alone, never on its batch."""
        block, new = self.model.config.block_size, params.max_new_tokens
        room = block - len(ids)
        if params.fit_new_tokens and 0 < room < new:
            return Row(ids, params, self.tokenizer, room)
        if len(ids) + new <= block:
            return Row(ids, params, self.tokenizer)
        if params.trim_prompt:
            keep = block - min(new, block // 2)  # leave room for an answer, at most half the context
            return Row(ids[-keep:], params, self.tokenizer, min(new, block - keep))
        raise UserError(f"prompt of {len(ids)} tokens + {new} new tokens is past the context "
                        f"of {block}; shorten it, lower max_new_tokens, or trim the prompt")

    def start(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Row]:
        params.validate(self.tokenizer.vocab_size)
        if any(not p for p in prompts):
            raise UserError("an empty prompt: give at least one token")
        return [self._fit(list(p), params) for p in prompts]

    @torch.inference_mode()
    def steps(self, rows: list[Row], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        """Decode a batch; after each step yield the (row, token) pairs that are new and not stop tokens
        (each row has taken its token: Row.push). Decoding ends when every row is done."""
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
    def _accept(rows: list[Row], tokens: list[int], stop_ids: set[int]) -> list[tuple[int, int]]:
        """One step's token per row: a stop token ends its row (and is not kept); done rows are skipped."""
        new = []
        for i, t in enumerate(tokens):
            r = rows[i]
            if r.done:
                continue
            if t in stop_ids:
                r.finish("stop")
                continue
            r.push(t)
            new.append((i, t))
        return new

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete a batch of tokenised prompts (left padding, per-sequence stopping)."""
        rows = self.start(prompts, params)
        for _ in self.steps(rows, params):
            pass
        for r in rows:
            r.finish("length")
        return [Completion(r.ids, r.text, r.finish_reason, len(r.prompt), r.max_new < params.max_new_tokens)
                for r in rows]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text chunks of one completion as they are decoded; never half a character, never a stop string."""
        rows = self.start([prompt], params)
        r = rows[0]
        for _ in self.steps(rows, params):
            if chunk := r.pending():
                yield chunk
        r.finish("length")
        if chunk := r.pending():
            yield chunk


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
