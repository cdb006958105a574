"""MiniGLM: a small decoder-only transformer in two styles.

  gpt2  — learned positions, LayerNorm, GELU, biases: the seed's MiniGLM (nanoGPT), so its
          checkpoints load as they are. Names match GPT2LMHeadModel (whose Conv1D weights are
          the transposes of these nn.Linear ones).
  llama — RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases: the default. Names match
          LlamaForCausalLM one to one.

forward() takes optional position ids (packing restarts them per record; left padding starts
them at the first real token) and an optional 2-D padding mask, and a KVCache for generation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass
class ModelConfig:
    style: str = "llama"  # "llama" | "gpt2"
    vocab_size: int = 8192
    block_size: int = 512
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # 0: same as n_head (no grouping)
    n_embd: int = 384
    intermediate_size: int = 0  # 0: 4*n_embd (gpt2), or ~8/3*n_embd rounded up to 64 (llama)
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = True  # gpt2 only; llama has no biases
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.intermediate_size == 0:
            swiglu = 64 * math.ceil(8 * self.n_embd / 3 / 64)  # same parameter count as a 4x GELU MLP
            self.intermediate_size = 4 * self.n_embd if self.style == "gpt2" else swiglu
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must be divisible by n_head, and n_head by n_kv_head")

    def validate(self) -> None:
        """Types and ranges, each error naming the key, the value and what is valid (ValueError)."""
        if self.style not in ("gpt2", "llama"):
            raise ValueError(f"style must be 'gpt2' or 'llama', got {self.style!r}")
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            wanted = (int, float) if kind is float else kind  # an int is a fine float (rope_theta = 10000)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, wanted):
                raise ValueError(f"{f.name} must be {KINDS[kind]}, got {value!r}")
        for key, low in (("vocab_size", 1), ("block_size", 1), ("n_layer", 1), ("n_head", 1), ("n_kv_head", 0),
                         ("n_embd", 1), ("intermediate_size", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be at least {low}, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("rope_theta", "norm_eps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be greater than 0, got {getattr(self, key)}")
        if self.style == "llama" and self.n_embd % self.n_head == 0 and self.n_embd // self.n_head % 2:
            raise ValueError(f"n_embd must be an even multiple of n_head in llama style (rotary embeddings turn "
                             f"pairs): head_dim n_embd/n_head = {self.n_embd}/{self.n_head} is odd")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_head, max_len, head_dim) each.

    `pos` is how many positions are filled; a step writes its keys in place, never concatenates.
    `mask` (B, max_len) marks real tokens, so left padding is never attended to.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # left padding per row
        self.padded = False  # any masked position: decoding then needs an explicit attention mask
        self.max_pad = 0  # the most left padding of any row
        self.pos = 0
        self.max_len = max_len


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin per position (block_size, head_dim), HF's layout (rotate halves, not interleaved pairs),
    the sign of rotate_half folded into sin's first half: apply_rope is then one swap and two products."""
    dims = torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** dims)
    t = torch.arange(config.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]: the halves swapped (one flip of a
    (2, D/2) view: fewer ops than roll's narrow, narrow, cat, backward too), sin's sign folded in."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


def fused_linear(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor:
    """Several bias-free products of one input as one product over their weights concatenated: the
    weights stay separate parameters (names as in LlamaForCausalLM), a training step runs one product,
    one cast of its input and weight under autocast, and one backward, instead of one each. A layer that is
    not a plain nn.Linear (a LoRA adapter) is called as itself."""
    if all(type(m) is nn.Linear for m in linears):
        return F.linear(x, torch.cat([m.weight for m in linears]))
    return torch.cat([m(x) for m in linears], dim=-1)


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor: as an operand it costs one op, where a Python number is first made a tensor and
    cast (four ops more, each a trip through the dispatcher). Made once (torch.compile traces it into its
    graph instead: dynamo warns of cached functions)."""
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=dtype)
    return _cached_scalar(value, dtype)


@functools.cache
def _cached_scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: 1.5x faster than autograd's (nn.RMSNorm's) on CPU, in fewer passes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = torch.rsqrt(torch.addcmul(_scalar(eps, x.dtype), norm, norm, value=1 / x.size(-1)))  # mean(x²) + eps
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, dy):
        xhat, r, weight = ctx.saved_tensors
        dyw = dy * weight
        dot = torch.linalg.vecdot(dyw, xhat, dim=-1).unsqueeze(-1)
        dx = torch.addcmul(dyw, xhat, dot, value=-1 / xhat.size(-1)).mul_(r)
        dw = (dy * xhat).reshape(-1, xhat.size(-1)).sum(0)
        return dx, dw, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same weights, same outputs); when training on CPU, through _RMSNormFn's faster backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return _RMSNormFn.apply(x, self.weight, self.eps or torch.finfo(x.dtype).eps)
        return super().forward(x)


def attend(q, k, v, layer: int, cache: KVCache | None, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, D) tensors, through the cache when there is one."""
    if cache is not None:
        t = q.size(2)
        cache.k[layer, :, :, cache.pos:cache.pos + t] = k
        cache.v[layer, :, :, cache.pos:cache.pos + t] = v
        k = cache.k[layer, :, :, :cache.pos + t]
        v = cache.v[layer, :, :, :cache.pos + t]
    if q.size(2) == 1 and DECODE_ATTENTION == "matmul":
        return decode_attention(q, k, v, mask)
    # No mask: causal over a fresh sequence, or one new token attending to every cached position.
    causal = mask is None and q.size(2) > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                          enable_gqa=k.size(1) != q.size(1))


# One query token (decoding): scaled_dot_product_attention, or two plain matmuls with the query heads
# grouped over their shared key/value head by a reshape. bench/decode.py compares both; on the 2-core
# EPYC they measure within 4% of each other, SDPA ahead, so SDPA is the default.
DECODE_ATTENTION = "sdpa"  # "sdpa" | "matmul"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    B, H, _, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    q = q.view(B, Hkv, H // Hkv, D)
    scores = (q @ k.transpose(-1, -2)) * (D ** -0.5)  # (B, Hkv, G, S)
    if mask is not None:  # (B, 1, 1, S) boolean: True = attend
        scores = scores.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, D)


# --- gpt2 style ----------------------------------------------------------------------------------
class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.dropout = c.n_head, c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x, layer, cache, mask, rope=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = attend(q, k, v, layer, cache, mask, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
        self.c_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x, layer, cache, mask, rope=None):
        x = x + self.attn(self.ln_1(x), layer, cache, mask)
        return x + self.mlp(self.ln_2(x))


# --- llama style ---------------------------------------------------------------------------------
class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        d = c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * d, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * d, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * d, bias=False)
        self.o_proj = nn.Linear(c.n_head * d, c.n_embd, bias=False)
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = c.n_head, c.n_kv_head, d, c.dropout
        self.qkv_proj: nn.Module | None = None  # q, k and v in one product, set for decoding (engine.py)

    def forward(self, x, layer, cache, mask, rope):
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x) if self.qkv_proj is not None else fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        # (B, T, heads, D): q and k rotated together (rope's tables are (T, 1, D) or (B, T, 1, D)), and the
        # heads moved forward as views, no copies (SDPA takes the strides)
        qk, v = qkv.view(B, T, H + 2 * Hkv, self.head_dim).split_with_sizes([H + Hkv, Hkv], dim=2)
        q, k = apply_rope(qk, *rope).split_with_sizes([H, Hkv], dim=2)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layer, cache, mask,
                   self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one product, set for decoding

    def forward(self, x):
        if self.gate_up_proj is not None:  # a decoding copy's own fused product
            gate_up = self.gate_up_proj(x)
        else:
            gate_up = fused_linear(x, self.gate_proj, self.up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, eps=c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, eps=c.norm_eps)
        self.mlp = LlamaMLP(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, layer, cache, mask, rope):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), layer, cache, mask, rope))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


# --- the model -----------------------------------------------------------------------------------
class MiniGLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        if c.style == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                wpe=nn.Embedding(c.block_size, c.n_embd),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList(GPT2Block(c) for _ in range(c.n_layer)),
                ln_f=nn.LayerNorm(c.n_embd, bias=c.bias, eps=c.norm_eps),
            ))
        else:
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(c.vocab_size, c.n_embd),
                layers=nn.ModuleList(LlamaBlock(c) for _ in range(c.n_layer)),
                norm=RMSNorm(c.n_embd, eps=c.norm_eps),
            ))
            cos, sin = rope_tables(c)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.transformer.wte if self.config.style == "gpt2" else self.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h if self.config.style == "gpt2" else self.model.layers

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embeddings.weight.numel() if not self.config.tie_embeddings else 0
            if self.config.style == "gpt2":
                n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V) and the mean loss over targets != -100 (if given).

        position_ids (B, T): default 0..T-1 (after the cache's filled positions). Where they restart
        at 0 inside a row (packing), attention does not cross the restart.
        attention_mask (B, T) of 1/0 marks real tokens and padding (left padding for generation).
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if cache is not None and attention_mask is not None:
            cache.mask[:, past:past + T] = attention_mask.bool()
            cache.n_pad += (attention_mask == 0).sum(-1)
            cache.padded = cache.padded or bool((attention_mask == 0).any())
            cache.max_pad = int(cache.n_pad.max())
        # Left padding takes cache slots but no positions: the shortest row must fit the block; a longer
        # row reaching the end has finished (the engine's per-row limit), its positions are clamped below.
        if past + T - (cache.max_pad if cache is not None else 0) > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the block size {self.config.block_size}")
        # fresh (training, scoring): positions 0..T-1 in every row, plain causal attention. No mask to build,
        # so no check for restarts either (a host sync on a GPU), and one row of positions, broadcast.
        fresh = position_ids is None and cache is None and attention_mask is None
        if fresh:
            position_ids, mask = torch.arange(T, device=idx.device), None
        else:
            if position_ids is None:  # with left padding, positions count real tokens only
                position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
                if cache is not None:
                    position_ids = (position_ids - cache.n_pad[:, None]).clamp(0, self.config.block_size - 1)
                elif attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = self._attention_mask(position_ids, attention_mask, cache, T)

        if self.config.style == "gpt2":
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
            rope = None
        else:
            x = self.model.embed_tokens(idx)
            rope = self._rope(position_ids, fresh, x)
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache, mask, rope)
        x = self.transformer.ln_f(x) if self.config.style == "gpt2" else self.model.norm(x)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _rope(self, position_ids: torch.Tensor, fresh: bool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, (T, 1, D) or (B, T, 1, D) to broadcast over (B, T, heads, D), in the
        dtype q and k will have (autocast's, else the weights'): cast once here, not in every layer's
        products (where bf16 q times fp32 cos would also make q and k fp32, for SDPA to cast back). As HF's
        Llama, which casts its tables to q's dtype."""
        cos, sin = (self.rope_cos[:position_ids.size(-1)], self.rope_sin[:position_ids.size(-1)]) if fresh else (
            self.rope_cos[position_ids], self.rope_sin[position_ids])  # fresh: slices, not a gather per row
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)

    @staticmethod
    def _attention_mask(position_ids, attention_mask, cache, T) -> torch.Tensor | None:
        """None means plain causal attention (the fast path); else a (B, 1, T, S) boolean mask."""
        if cache is not None:
            past = cache.pos
            if attention_mask is None and (T == 1 or past == 0) and not cache.padded:
                return None
            keys = cache.mask[:, :past + T]  # (B, S)
            q_pos = torch.arange(past, past + T, device=keys.device)
            k_pos = torch.arange(past + T, device=keys.device)
            causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
            mask = causal[None] & keys[:, None, :]
            # a fully padded query row (a pad token itself) attends to itself so softmax stays finite
            mask[:, torch.arange(T), q_pos] = True
            return mask[:, None]
        restarts = (position_ids[:, 1:] == 0).any() if T > 1 else False
        if attention_mask is None and not restarts:
            return None
        causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
        mask = causal[None].expand(position_ids.size(0), T, T)
        if restarts:  # packing: a record attends only within itself
            segment = (position_ids == 0).long().cumsum(-1)
            mask = mask & (segment[:, :, None] == segment[:, None, :])
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None]
        return mask[:, None]
