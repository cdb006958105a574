"""Chat templates: one function renders a chat for training (ids + labels) and for inference (a prompt).

Segments (role markers, each message, end tokens) are tokenised separately and their ids joined,
so the seam between prompt and answer never depends on BPE merges. Labels are -100 on everything
but the assistant's answers and the end-of-turn token that closes each of them.

Native `miniglm` layout, with the tokenizer's role tokens:

    <|endoftext|> [<|system|> S <|end|>] <|user|> Q <|end|> <|assistant|> A <|end|> ...
"""

from __future__ import annotations

from dataclasses import dataclass

from miniglm.fileio import UserError
from miniglm.tokenizer import EOT, Tokenizer

IGNORE = -100


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]
    stop_ids: list[int]  # tokens that end an assistant turn at inference


def render_miniglm(messages: list[dict], tok: Tokenizer, add_generation_prompt: bool = False,
                   train_all_turns: bool = True) -> Rendered:
    ids, labels = [tok.special(EOT)], [IGNORE]
    end = tok.special("<|end|>")
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)

    def add(segment: list[int], trained: bool) -> None:
        ids.extend(segment)
        labels.extend(segment if trained else [IGNORE] * len(segment))

    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise UserError(f"unknown role '{role}' (expected system, user or assistant)")
        add([tok.special(f"<|{role}|>")], False)
        trained = role == "assistant" and (train_all_turns or i == last_assistant)
        add(tok.encode(m["content"]) + [end], trained)
    if add_generation_prompt:
        add([tok.special("<|assistant|>")], False)
    return Rendered(ids, labels, [end])


TEMPLATES = {"miniglm": render_miniglm}


def render(template: str, messages: list[dict], tok: Tokenizer, add_generation_prompt: bool = False,
           train_all_turns: bool = True) -> Rendered:
    if template not in TEMPLATES:
        raise UserError(f"unknown template '{template}' (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[template](messages, tok, add_generation_prompt, train_all_turns)
