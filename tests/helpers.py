"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket

import torch

from miniglm.model import MiniGLM, ModelConfig
from miniglm.tokenizer import Tokenizer


def tiny(style: str = "llama", **kw) -> MiniGLM:
    """A two-layer, 32-wide model seeded at 0, grouped-query attention when llama-style; kw overrides any
    setting. Fresh, so in train mode: a test that wants inference calls .eval()."""
    torch.manual_seed(0)
    settings = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2 if style == "llama" else 0,
                    n_embd=32)
    return MiniGLM(ModelConfig(style=style, **{**settings, **kw}))


def favours_special_tokens(tok: Tokenizer) -> MiniGLM:
    """A random one-layer model over the test BPE that samples tok's special tokens often: the tests that
    they stay out of the text unless kept need some in the output."""
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=400, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    with torch.no_grad():  # tied embeddings: larger rows, likelier tokens
        model.embeddings.weight[sorted(tok.all_special_ids)] *= 10
    return model


def free_port() -> int:
    """A loopback port that is free now (the OS picks it), for a server or torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
