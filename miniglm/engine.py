"""Generation: one prefill, then one token per step through a preallocated KV cache.

A batch of prompts is left-padded (an attention mask keeps padding out, positions count real tokens)
and each sequence stops on its own: at a stop token or a stop string, neither of which is returned.
Streaming goes through the StreamDecoder, so a chunk never holds half a character. The sampler never
picks a token that would make the text invalid UTF-8 (TextMask), and a seeded row draws from its own
generator, so its answer does not depend on its batch.
"""

from __future__ import annotations

import copy
import hashlib
import math
import weakref
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field

import torch
import torch.nn.functional as F

from miniglm import model as model_mod
from miniglm.devices import model_device, resolve_device
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
        need(_is_finite(self.temperature) and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2),
             "temperature", f"must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} to 2")
        top = vocab_size if vocab_size is not None else MAX_TOP_K
        need(_is_int(self.top_k) and 0 <= self.top_k <= top, "top_k", f"must be an integer from 0 (off) to {top}")
        need(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number above 0 and at most 1")
        need(_is_finite(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
             "repetition_penalty", f"must be a number from {MIN_REPETITION_PENALTY:g} to 10 (1 = off)")
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
# Below these, logits / temperature and logits / penalty overflow float32 (inf, then NaN probabilities):
# validate refuses them, sample_next takes them at the floor. 1e-5 is already greedy in all but ties.
MIN_TEMPERATURE, MIN_REPETITION_PENALTY = 1e-5, 1e-2
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
    mask: TextMask | None = field(default=None, repr=False)  # the tokens allowed next, by utf8 state
    utf8: int = 0  # where the text's UTF-8 stands after the new tokens: a TextMask state (0: a boundary)
    decoder: StreamDecoder = field(init=False, repr=False)

    def __post_init__(self, tokenizer: Tokenizer) -> None:
        self.decoder = StreamDecoder(tokenizer, self.params.skip_special_tokens)
        if self.max_new is None:
            self.max_new = self.params.max_new_tokens

    def push(self, token: int) -> None:
        """Take one new token (not a stop token); the row ends at a stop string or at max_new_tokens."""
        self.ids.append(token)
        if self.mask is not None:
            self.utf8 = self.mask.after(self.utf8, token)
        self.text += self.decoder.push(token)
        self._cut_at_stop()
        if len(self.ids) >= self.max_new:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row (a stop token, the length limit, ...): the decoder's held-back bytes become text, but
        for a character the limit cut short, which is dropped (never a U+FFFD at the end)."""
        if self.done:
            return
        self.done, self.finish_reason = True, reason
        self.text += self.decoder.flush(drop_partial=True)
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
                generator: torch.Generator | None, uniforms: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). history (B, S) holds the ids seen so far, for the repetition penalty.
    A sampled token is where the row's uniform draw falls in its cumulative probabilities (inverse CDF):
    uniforms (B,) are the rows' draws in [0, 1), else drawn from `generator`. So rows that each keep a
    generator of their own (seeded rows, in Engine and the server) still sample in one batch of ops.
    mask (B or 1, V): added to the logits, -inf on the tokens a row may not take and 0 on the rest
    (TextMask.rows), before top-k and top-p, so they choose among the rest; greedy takes the best allowed
    token. A temperature or penalty under
    its floor (validate refuses them) is taken at the floor: greedy, MIN_REPETITION_PENALTY."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        penalty = max(params.repetition_penalty, MIN_REPETITION_PENALTY)
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        logits = logits.scatter(1, history, seen)
    if params.temperature < MIN_TEMPERATURE:  # 0: greedy, the limit of sampling as the temperature falls
        return (logits if mask is None else logits + mask).argmax(-1)
    logits = logits / params.temperature
    if mask is not None:  # an add, in place (the division made a new tensor): on CPU masked_fill is ~20x slower
        logits += mask
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    cdf = logits.softmax(-1).cumsum_(-1)
    if not torch.isfinite(cdf[:, -1]).all():
        raise ValueError("probability tensor contains inf or nan: check the temperature and the model's logits")
    if uniforms is None:
        uniforms = torch.rand(cdf.size(0), generator=generator, device=cdf.device)
    # right=True: the first token whose cumulative probability passes the draw, never one of probability 0;
    # the draw scaled by the row's total, which rounding leaves a hair off 1
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picked.clamp_(max=cdf.size(-1) - 1)


# --- valid text by construction -------------------------------------------------------------------
# The states of a row's UTF-8: at a character boundary, or inside a character with bytes still owed.
# A count alone (1-3 owed) would let overlong forms, surrogates and code points past U+10FFFF through, so
# the lead bytes that narrow the next byte's range (E0, ED, F0, F4) have states of their own, as in the
# standard UTF-8 automaton. EF and EF BF track U+FFFD (EF BF BD): broken text's mark is never sampled.
BOUNDARY, OWE1, OWE2, OWE3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4, AFTER_EF, AFTER_EFBF = range(10)
N_STATES = 10
# the next byte's range in each state inside a character, and the state after it
_OWED = {OWE1: (0x80, 0xBF, BOUNDARY), OWE2: (0x80, 0xBF, OWE1), OWE3: (0x80, 0xBF, OWE2),
         AFTER_E0: (0xA0, 0xBF, OWE1), AFTER_ED: (0x80, 0x9F, OWE1), AFTER_F0: (0x90, 0xBF, OWE2),
         AFTER_F4: (0x80, 0x8F, OWE2), AFTER_EF: (0x80, 0xBF, OWE1), AFTER_EFBF: (0x80, 0xBF, BOUNDARY)}
# The only C0 control characters sampled. A rule, not a measurement: tokens holding any other are masked even
# where the tokenizer's training text had them (no run here is trained on such text; a chat answer never wants them).
ALLOWED_C0 = b"\t\n\r"


def utf8_step(state: int, b: int) -> int:
    """The state after byte b, or N_STATES where b makes the text invalid (or a C0 control, or U+FFFD)."""
    bad = N_STATES
    if state == BOUNDARY:
        if b < 0x80:
            return BOUNDARY if b >= 0x20 or b in ALLOWED_C0 else bad
        for lo, hi, after in ((0xC2, 0xDF, OWE1), (0xE0, 0xE0, AFTER_E0), (0xED, 0xED, AFTER_ED),
                              (0xEF, 0xEF, AFTER_EF), (0xE1, 0xEF, OWE2), (0xF0, 0xF0, AFTER_F0),
                              (0xF4, 0xF4, AFTER_F4), (0xF1, 0xF3, OWE3)):
            if lo <= b <= hi:
                return after
        return bad  # a continuation byte, C0/C1 (overlong leads), F5-FF
    lo, hi, after = _OWED[state]
    if not lo <= b <= hi or (state == AFTER_EFBF and b == 0xBD):
        return bad
    return AFTER_EFBF if state == AFTER_EF and b == 0xBF else after


class TextMask:
    """Which tokens may come next, by the row's UTF-8 state: `blocked` (states, width) is True where a
    token's bytes cannot continue the state validly, `next` the state a token leaves. Built once per
    tokenizer and vocabulary width (every id's bytes walked through the automaton from every state, all
    ids at once); a decoding step then costs one gather (none when the rows share a state) and one add
    of -inf where blocked, for the whole batch.

    At a boundary a token may not start with a continuation byte, hold an invalid sequence, a C0 control
    other than \\t \\n \\r, or U+FFFD; inside a character it must continue or complete it. Special tokens
    are allowed at a boundary only; ids past the tokenizer's are never allowed. A state no token leaves
    is never entered. A token taken though blocked (only where the mask is off) resyncs to a boundary."""

    def __init__(self, tokenizer: Tokenizer, width: int):
        n = min(width, tokenizer.vocab_size)
        # Tokenizer's own, or its default over token_bytes for a stand-in with no more than that (tests, benches)
        piece_bytes = getattr(tokenizer, "piece_bytes", None) or (lambda i: Tokenizer.piece_bytes(tokenizer, i))
        pieces = [piece_bytes(i) for i in range(n)]
        # every state x every token, a byte at a time: the tokens longest first, so the j-th bytes are of a prefix
        order = sorted(range(n), key=lambda i: -len(pieces[i] or b""))
        walk = [pieces[i] or b"" for i in order]
        step = torch.tensor([[utf8_step(s, b) for b in range(256)] for s in range(N_STATES)] + [[N_STATES] * 256])
        joined = torch.frombuffer(bytearray(b"".join(walk)) or bytearray(1), dtype=torch.uint8).long()
        starts = torch.tensor([0] + [len(p) for p in walk]).cumsum(0)[:-1]
        walked = torch.arange(N_STATES)[:, None].repeat(1, n)
        k = n
        for j in range(len(walk[0]) if walk else 0):
            while len(walk[k - 1]) <= j:
                k -= 1
            walked[:, :k] = step[walked[:, :k], joined[starts[:k] + j]]
        state = torch.empty_like(walked)
        state[:, order] = walked
        state[:, [i for i, p in enumerate(pieces) if p is None]] = N_STATES
        specials = {*tokenizer.all_special_ids, *getattr(tokenizer, "special_ids", {}).values()}
        special = torch.tensor(sorted(i for i in specials if i < n), dtype=torch.long)
        state[:, special] = N_STATES
        state[BOUNDARY, special] = BOUNDARY
        while True:  # a state no token can leave would trap a row: block the tokens that lead into it
            dead = (state < N_STATES).sum(1) == 0
            into = torch.cat([dead, torch.tensor([False])])[state] & (state < N_STATES)
            if not into.any():
                break
            state[into] = N_STATES
        blocked = torch.ones(N_STATES, width, dtype=torch.bool)
        blocked[:, :n] = state == N_STATES
        self.blocked = blocked
        self.next = torch.where(blocked[:, :n], BOUNDARY, state).to(torch.uint8)
        self._next = [bytes(row.tolist()) for row in self.next]  # Row.push's lookups, in Python
        self._on: dict[tuple[str, int | None], torch.Tensor] = {}

    def after(self, state: int, token: int) -> int:
        """The state after one token (a row's, in Row.push)."""
        row = self._next[state]
        return row[token] if token < len(row) else BOUNDARY

    def table(self, device: torch.device | str, width: int | None = None) -> torch.Tensor:
        """(states, width) fp32 on the device (made there once): -inf where blocked, else 0."""
        key = (str(device), width)
        if key not in self._on and width:
            self._on[key] = self.table(device)[:, :width]
        elif key not in self._on:
            self._on[key] = torch.zeros(self.blocked.shape).masked_fill_(self.blocked, float("-inf")).to(device)
        return self._on[key]

    def rows(self, states: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The mask sample_next adds to logits (B, V) (V at most the mask's width) for rows in these states.
        Rows all in one state (most steps: all at a boundary) share its row, (1, V), a view: no gather."""
        table = self.table(logits.device, logits.size(-1))
        if all(s == states[0] for s in states):
            return table[states[0]:states[0] + 1]
        return table.index_select(0, torch.tensor(states, device=logits.device))


_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mask_for(tokenizer: Tokenizer, width: int) -> TextMask:
    """The tokenizer's TextMask over `width` ids (a model's vocabulary), built once and kept while the
    tokenizer lives."""
    masks = _MASKS.setdefault(tokenizer, {})
    if width not in masks:
        masks[width] = TextMask(tokenizer, width)
    return masks[width]


def row_generator(seed: int, prompt: Sequence[int], device: torch.device | str) -> torch.Generator:
    """A seeded row's own generator (Engine's and the server's), seeded from the seed and the row's prompt:
    a prompt gets the same answer in any batch and at any place in it, while other prompts in the batch do
    not draw the same numbers. Another sample of one prompt: another seed."""
    h = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8)  # a seed past 64 bits: an error
    h.update(array("q", prompt).tobytes())
    return torch.Generator(device=device).manual_seed(int.from_bytes(h.digest(), "little"))


def fused_weight(linears: Sequence[torch.nn.Module], scale: torch.Tensor | None) -> torch.Tensor:
    """The linears' weights stacked (out, in), their input columns times `scale` (a norm's weight) if given."""
    weight = torch.cat([lin.out_in() if isinstance(lin, DecodeLinear) else lin.weight.detach() for lin in linears])
    return weight if scale is None else weight * scale


class DecodeLinear(torch.nn.Module):
    """One or more nn.Linear layers of the same input as one product (fewer, wider products), its weight
    stored transposed, (in, out): on CPU a few rows (decoding, batch 1 to 8) multiply by it up to 2.5x
    faster than by nn.Linear's (out, in) layout, and a prefill's hundreds of rows as fast (bench/decode.py,
    2-core Xeon). transposed=False keeps the (out, in) layout (F.linear)."""

    def __init__(self, *linears: torch.nn.Module, transposed: bool = True, scale: torch.Tensor | None = None):
        super().__init__()
        weight = fused_weight(linears, scale)
        self.transposed = transposed
        self.weight = torch.nn.Parameter((weight.t() if transposed else weight).contiguous(), requires_grad=False)
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                      requires_grad=False)

    def out_in(self) -> torch.Tensor:
        """The weight as nn.Linear holds it, (out, in)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + bias, plus `add` (a residual) when given: one addmm for 2-D rows without a bias."""
        w = self.weight if self.transposed else self.weight.t()  # (in, out), a view when not transposed
        if add is not None and self.bias is None and x.dim() == 2:
            return torch.addmm(add, x, w)
        if self.bias is None:
            y = torch.mm(x, w) if x.dim() == 2 else x @ w  # mm: no trip through matmul's shape logic
        else:
            y = torch.addmm(self.bias, x.flatten(0, -2), w).view(*x.shape[:-1], -1)
        return y if add is None else y + add


class Int8Linear(torch.nn.Module):
    """One or more nn.Linear layers of the same input as one int8 product: weights rounded to int8 with
    one scale per output channel (symmetric), each input row quantized to int8 on the fly (one scale per
    row, as llama.cpp's Q8_0 does with its activations) and multiplied in int32 by torch._int_mm.
    The weight stays (out, in) and goes in transposed: oneDNN then takes each output's dot product along
    contiguous memory, 2.5-3x faster for a few rows than an (in, out) copy (bench/RESULTS.md)."""

    def __init__(self, *linears: torch.nn.Module, scale: torch.Tensor | None = None):
        super().__init__()
        weight = fused_weight(linears, scale)
        w_max = weight.abs().amax(dim=1).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(weight * (127 / w_max[:, None])).to(torch.int8))  # (out, in)
        self.register_buffer("out_scale", w_max / (127 * 127))  # int32 sums -> floats, with the row's max
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        x_max = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
        sums = torch._int_mm(torch.round(rows * (127 / x_max)).to(torch.int8), self.weight.t())
        base = self.bias  # what the scaled sums are added to: bias, residual, both or neither
        if add is not None:
            add = add.reshape(sums.shape)
            base = add if base is None else add + base
        scale = x_max * self.out_scale
        y = sums * scale if base is None else torch.addcmul(base, sums, scale)
        return y.view(*x.shape[:-1], -1)


def for_decoding(model: MiniGLM, transposed: bool = True, int8: bool = False, n_ids: int | None = None) -> MiniGLM:
    """A copy of the model for decoding, in eval mode (the caller's model is left as it is): llama's q/k/v
    and gate/up projections fused, each RMSNorm's scale folded into the product after it (the norm's weight
    set to 1), every linear layer a DecodeLinear (transposed: its weight stored (in, out)) or an Int8Linear.
    n_ids: a vocabulary padded past the tokenizer's ids gets an output layer over its first n_ids only, so
    no id the tokenizer cannot decode is ever sampled."""
    from miniglm.model import LlamaBlock

    # The linear layers are rebuilt below from their weights: the copy shares them rather than copying
    # them first (not a tied embedding's, which the copy keeps). Halves the peak memory of a 135M model.
    # Each is replaced below (a new module, new tensors), so nothing done to the copy reaches the caller's.
    kept = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    memo = {id(p): p for m in model.modules() if type(m) is torch.nn.Linear
            for p in m.parameters(recurse=False) if id(p) not in kept}
    model = copy.deepcopy(model, memo).eval()
    if n_ids is not None and n_ids < model.config.vocab_size:
        head = torch.nn.Linear(model.config.n_embd, n_ids, bias=False)
        head.weight = torch.nn.Parameter(model.lm_head.weight.detach()[:n_ids], requires_grad=False)
        model.lm_head = head

    def fused(*linears: torch.nn.Module, norm: torch.nn.RMSNorm | None = None) -> torch.nn.Module:
        scale = None
        if norm is not None:
            scale = norm.weight.detach().clone()
            norm.weight.data.fill_(1.0)
        return Int8Linear(*linears, scale=scale) if int8 else DecodeLinear(*linears, transposed=transposed,
                                                                           scale=scale)

    for block in model.blocks:
        if isinstance(block, LlamaBlock) and block.self_attn.qkv_proj is None:  # not a decoding copy already
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_proj = fused(attn.q_proj, attn.k_proj, attn.v_proj, norm=block.input_layernorm)
            mlp.gate_up_proj = fused(mlp.gate_proj, mlp.up_proj, norm=block.post_attention_layernorm)
            del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear or (int8 and type(child) is DecodeLinear):
                setattr(module, name, fused(child))
    return model


class DecodeStep:
    """One decoding step of a llama-style decoding copy (for_decoding): the next token of every row through
    the KV cache, as a flat loop over the layers' weights. The same arithmetic as MiniGLM.forward with one
    new token, in fewer ops: at batch 1 a small model's step is mostly per-op dispatch, not arithmetic.
    Per layer: the RMSNorms' scales are already in the products after them, RoPE rotates q and k together
    (sin carries rotate-half's sign), the cache is written in place and each residual add rides in its
    product (addmm).

    compile=True: the step through torch.compile, over static shapes: the cache holds the whole block
    (Engine allocates it so) and attention reads a bucket of it (a power of two >= 256 positions, the
    positions past the new one masked out), so a few compiles serve every length (one per bucket and
    batch size), not one per step.

    graphs=True (the default on CUDA): the same static-shape step recorded once per batch size, bucket and
    cache as a CUDA graph (StepGraph) and replayed at each step: one launch instead of ~100 kernel launches
    from Python, which is what a small model's step on a GPU is bound by. On the CPU graphs=True runs the
    same static buffers without a graph (what the tests check)."""

    def __init__(self, model: MiniGLM, compile: bool = False, graphs: bool | None = None):
        c = model.config
        self.eps = c.norm_eps
        self.n_head, self.n_kv, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.cos, self.sin = model.rope_cos, model.rope_sin  # sin carries rotate-half's sign (rope_tables)
        # the products' forward methods, called straight: nn.Module.__call__'s hooks logic costs a few
        # microseconds a call, which a small model's batch-1 step feels (bench/decode.py)
        self.layers = [(b.self_attn.qkv_proj.forward, b.self_attn.o_proj.forward, b.mlp.gate_up_proj.forward,
                        b.mlp.down_proj.forward) for b in model.blocks]
        self.embed, self.norm, self.head = model.model.embed_tokens.weight, model.model.norm, model.lm_head.forward
        device = model.rope_cos.device
        # each layer's index into the cache as a tensor, made once: a CUDA graph's capture may not copy from
        # the host, and a compiled step writes the cache in place only through index_put_
        self.layer_at = [torch.tensor([i], device=device) for i in range(c.n_layer)]
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.captured: dict[tuple, StepGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs and device.type == "cuda" else None
        self.compiled = None
        if compile:
            # Every engine's step shares one code object, so dynamo's cap of 8 compiles (then eager, silently)
            # would be reached by a few engines' batch sizes and buckets: raised to what a session can use.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # cpp_wrapper: on CPU the step runs as one C++ function, not a Python loop over kernels (2x on the
            # demo model, bench/decode.py --compile)
            cpu = model.rope_cos.device.type == "cpu"
            if cpu:
                check_cpp_compiler()
            self.compiled = torch.compile(self.bucket_step, dynamic=False, options={"cpp_wrapper": cpu})

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B,) -> logits (B, V); the cache advances one position."""
        pos, block = cache.pos, self.cos.size(0)
        if pos >= cache.max_len or pos - cache.max_pad >= block:
            raise ValueError(f"no room for position {pos}: cache of {cache.max_len}, block size {block}")
        if self.compiled is not None or self.graphs:
            S = min(max(256, 1 << pos.bit_length()), cache.max_len)  # a bucket of the cache: pos < S
            step = self.compiled or self.bucket_step
            try:
                if self.graphs:
                    logits = self.replay(step, tokens, cache, pos, S)
                else:
                    logits = step(tokens, cache.k, cache.v, cache.mask, cache.n_pad,
                                  torch.tensor([pos], device=tokens.device), S)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # inductor's own error: pages of trace
                raise UserError(f"torch.compile failed ({str(e).strip().splitlines()[0][:300]}); "
                                "decode without --compile") from None
        elif cache.padded:  # left padding: each row's position counts its real tokens; padding is masked out
            at = (pos - cache.n_pad).clamp(0, block - 1)
            logits = self.forward(tokens, self.cos[at].unsqueeze(1), self.sin[at].unsqueeze(1), cache.k, cache.v,
                                  pos, cache.mask[:, None, None, :pos + 1])
        else:
            logits = self.forward(tokens, self.cos[pos], self.sin[pos], cache.k, cache.v, pos, None)
        cache.pos += 1
        return logits

    def replay(self, step: Callable, tokens: torch.Tensor, cache: KVCache, pos: int, S: int) -> torch.Tensor:
        """The step through its StepGraph, recorded at the first step of this batch size, bucket and cache.
        The key holds the cache's addresses and strides: a graph reads and writes those very tensors."""
        tensors = (cache.k, cache.v, cache.mask, cache.n_pad)
        key = (tokens.size(0), S, cache.k.stride(), *(t.data_ptr() for t in tensors))
        graph = self.captured.get(key)
        if graph is None:
            if len(self.captured) >= MAX_GRAPHS:  # graphs of caches since freed: record anew what is used now
                self.captured.clear()
            graph = self.captured[key] = StepGraph(step, tokens, cache, pos, S, self.pool)
        return graph(tokens, pos)

    def bucket_step(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    n_pad: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
        """The compiled step: attention over the cache's first S positions (a bucket; those past `pos`
        masked out), each row's RoPE angle from its own position. Built inside the graph, so a step runs
        no eager op but making `pos`."""
        at = (pos - n_pad).clamp(0, self.cos.size(0) - 1)
        keep = (mask[:, :S] & (torch.arange(S, device=pos.device) <= pos))[:, None, None]
        return self.forward(tokens, self.cos[at].unsqueeze(1), self.sin[at].unsqueeze(1), k, v, pos, keep)

    def rms(self, x: torch.Tensor) -> torch.Tensor:  # the scale is in the next product: one op, no weight
        return F.rms_norm(x, (x.size(-1),), None, self.eps)

    def forward(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pos: int | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """k, v: the whole cache, (layers, B, n_kv_head, max_len, head_dim); the new keys and values go to
        `pos` (an int, or a (1,) tensor when compiled), and attention reads the mask's length of the cache
        (pos + 1 without a mask); mask (B, 1, 1, S) or None (attend to all)."""
        B, H, Hkv, D = tokens.size(0), self.n_head, self.n_kv, self.head_dim
        S = pos + 1 if mask is None else mask.size(-1)
        attention = model_mod.decode_attention if model_mod.DECODE_ATTENTION == "matmul" else sdpa
        x = F.embedding(tokens, self.embed)
        for layer, (qkv_proj, o_proj, gate_up_proj, down_proj) in enumerate(self.layers):
            # split_with_sizes: Tensor.split's Python wrapper costs more than the split
            qk, new_v = qkv_proj(self.rms(x)).view(B, H + 2 * Hkv, D).split_with_sizes([H + Hkv, Hkv], 1)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)
            q, new_k = qk.split_with_sizes([H, Hkv], 1)
            if isinstance(pos, int):
                k[layer, :, :, pos] = new_k
                v[layer, :, :, pos] = new_v
            else:  # index_put_ on the whole cache: torch.compile writes it in place (a view's copy it would not)
                at = self.layer_at[layer]
                k[at, :, :, pos] = new_k.unsqueeze(0)
                v[at, :, :, pos] = new_v.unsqueeze(0)
            y = attention(q.unsqueeze(2), k[layer, :, :, :S], v[layer, :, :, :S], mask)
            x = o_proj(y.view(B, H * D), x)
            gate, up = gate_up_proj(self.rms(x)).chunk(2, dim=-1)
            x = down_proj(F.silu(gate).mul_(up), x)
        return self.head(F.rms_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.eps))


MAX_GRAPHS = 64  # recorded steps kept per engine: batch sizes x length buckets x caches in use
MAX_CACHES = 8  # caches an engine keeps for its static steps (one per batch size and length)


class StepGraph:
    """One decoding step over static tensors: the token and position buffers here, the cache's own tensors.
    On CUDA it is recorded once as a CUDA graph and replayed at each later step (the step's ~100 kernels in
    one launch); elsewhere the step is called on the same buffers. Recording runs the step once for real
    first (CUDA's warm-up, on a side stream): that writes this step's keys and values at `pos`, which the
    replay then writes again, the same values, so the step taken at recording is taken exactly once."""

    def __init__(self, step: Callable, tokens: torch.Tensor, cache: KVCache, pos: int, S: int, pool=None):
        self.tokens = tokens.clone()
        self.pos = torch.tensor([pos], device=tokens.device)
        self.args = (self.tokens, cache.k, cache.v, cache.mask, cache.n_pad, self.pos, S)
        self.step, self.graph = step, None
        if tokens.is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(*self.args)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = step(*self.args)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)  # a kernel with the number as its argument: no copy from the host
        if self.graph is None:
            return self.step(*self.args)
        self.graph.replay()
        # a copy: the graphs share one memory pool, so another graph's replay may reuse this output's memory
        return self.logits.clone()


def check_cpp_compiler() -> None:
    """--compile on CPU builds C++: refuse at once, in one line, where no compiler is found (inductor's
    own search, which honours $CXX), rather than after loading the model with a page of traceback."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:
        raise UserError(f"--compile needs a C++ compiler (g++ or clang++ on PATH, or $CXX): {e}; "
                        "install one or leave --compile off") from None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1))


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
    def __init__(self, model: MiniGLM, tokenizer: Tokenizer, device: str | None = None, int8: bool = False,
                 transposed: bool = True, compile: bool = False, graphs: bool | None = None, valid_text: bool = True):
        """The model is decoded through a copy (for_decoding): fused products, on CPU with (in, out)
        weights (transposed=False: nn.Linear's (out, in)); llama-style models take their decoding steps
        through DecodeStep. Same logits as the model, to float rounding. The caller's model is left as it
        was (device, dtype, train/eval flag, weights); the copy is on `device`, by default the model's own.
        int8: int8 weights with per-channel scales (Int8Linear, CPU). Decoding a small model on a CPU
        streams every weight once per token, so a quarter of the bytes is up to ~4x the speed; the logits
        move slightly, so greedy output may differ from fp32.
        compile: decoding steps through torch.compile (DecodeStep; llama style): tens of seconds of compiling
        per new batch size or length bucket, then faster steps on some models (bench/decode.py measures).
        graphs: each step replayed as a CUDA graph (DecodeStep; llama style); None: on CUDA, off on the CPU.
        valid_text: sample only tokens that keep the text valid UTF-8 (TextMask; False: bench/utf8_mask.py's
        baseline)."""
        device = str(model_device(model)) if device is None else resolve_device(device)
        if int8 and device != "cpu":
            raise UserError("--int8 is for CPU decoding; leave it off on this device")
        cpu = device == "cpu"
        self.model = for_decoding(model, transposed and cpu, int8, tokenizer.vocab_size).to(device)
        self.decode_step = DecodeStep(self.model, compile, graphs) if self.model.config.style == "llama" else None
        self.compile = compile
        # static steps (compiled, graphs) read a bucket of a cache of the whole block; graphs also need the
        # same cache at each call, so those caches are kept per batch size and length
        self.static = compile or (self.decode_step is not None and self.decode_step.graphs)
        self.caches: dict[tuple[int, int], KVCache] = {}
        self.busy: set[tuple[int, int]] = set()  # the kept caches a decoding is using now
        self.tokenizer = tokenizer
        self.device = device
        self.text_mask = mask_for(tokenizer, self.model.config.vocab_size) if valid_text else None

    def cache_for(self, rows: int, length: int) -> KVCache:
        """An empty cache: a new one, or for static steps the one kept for this shape, emptied (no need to
        zero its keys: positions are masked until written)."""
        dtype = self.model.embeddings.weight.dtype
        key = (rows, length)
        if not self.static or key in self.busy:  # a decoding of this shape under way (two streams read in turn)
            return KVCache(self.model.config, rows, length, device=self.device, dtype=dtype)
        cache = self.caches.pop(key, None)  # and put back last: the least recently used shape goes first
        if cache is None:
            if len(self.caches) >= MAX_CACHES:
                self.caches.pop(next(iter(self.caches)))
            cache = KVCache(self.model.config, rows, length, device=self.device, dtype=dtype)
        self.caches[key] = cache
        cache.mask.fill_(True)
        cache.n_pad.zero_()
        cache.padded, cache.max_pad, cache.pos = False, 0, 0
        return cache

    def forward_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row (B,) through the cache -> the next logits (B, V)."""
        if self.decode_step is not None:
            return self.decode_step(tokens, cache)
        return self.model(tokens[:, None], cache=cache)[0][:, -1]

    def prompt_room(self, max_new_tokens: int) -> int:
        """The prompt tokens a trimmed prompt keeps: the context less room for an answer, at most half of it."""
        block = self.model.config.block_size
        return block - min(max_new_tokens, block // 2)

    def _fit(self, ids: list[int], params: SamplingParams) -> Row:
        """A row for one prompt: its new tokens capped at the context's room (fit_new_tokens), or its
        prompt's start dropped (trim_prompt), or an error. Depends on the prompt alone, never on its batch."""
        block, new = self.model.config.block_size, params.max_new_tokens
        room = block - len(ids)
        if params.fit_new_tokens and 0 < room < new:
            return Row(ids, params, self.tokenizer, room, mask=self.text_mask)
        if len(ids) + new <= block:
            return Row(ids, params, self.tokenizer, mask=self.text_mask)
        if params.trim_prompt:
            keep = self.prompt_room(new)
            return Row(ids[-keep:], params, self.tokenizer, min(new, block - keep), mask=self.text_mask)
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
        block = self.model.config.block_size
        length = max(block, L + steps) if self.static else L + steps  # static: one cache shape per batch size
        cache = self.cache_for(B, length)
        kept = self.caches.get((B, length)) is cache
        if kept:
            self.busy.add((B, length))
        try:
            yield from self._decode(rows, params, idx, mask, padded, steps, cache)
        finally:
            if kept:
                self.busy.discard((B, length))

    def _decode(self, rows: list[Row], params: SamplingParams, idx: torch.Tensor, mask: torch.Tensor,
                padded: bool, steps: int, cache: KVCache) -> Iterator[list[tuple[int, int]]]:
        generators = None
        if params.seed is not None and params.temperature > 0:
            generators = [row_generator(params.seed, r.prompt, self.device) for r in rows]
        history = None
        if params.repetition_penalty != 1.0:  # padded with the row's own first token, never penalised twice
            history = torch.where(mask.bool(), idx, idx.gather(1, (mask == 0).sum(1, keepdim=True))).to(self.device)
        idx = idx.to(self.device)
        logits, _ = self.model(idx, attention_mask=mask.to(self.device) if padded else None, cache=cache)
        stop_ids = set(params.stop_ids)
        logits = logits[:, -1]
        for _ in range(steps):
            uniforms = None if generators is None else torch.cat(
                [torch.rand(1, generator=g, device=self.device) for g in generators])
            mask = None if self.text_mask is None else self.text_mask.rows([r.utf8 for r in rows], logits)
            nxt = sample_next(logits, params, history, None, uniforms, mask)
            yield self._accept(rows, nxt.tolist(), stop_ids)
            if all(r.done for r in rows):
                return
            if history is not None:
                history = torch.cat([history, nxt[:, None]], dim=1)
            logits = self.forward_step(nxt, cache)

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

    def decode_all(self, rows: list[Row], params: SamplingParams) -> None:
        """Every row to its end (its stop, its limit)."""
        for _ in self.steps(rows, params):
            pass

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete a batch of tokenised prompts (left padding, per-sequence stopping)."""
        rows = self.start(prompts, params)
        self.decode_all(rows, params)
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
