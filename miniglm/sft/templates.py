"""Chat templates: one function per model family renders a chat for training (ids + labels) and,
with add_generation_prompt=True, the prompt the generation engine feeds the model — the same code,
so training and inference never disagree.

Segments (role markers, each message, end tokens) are tokenised separately and their ids joined,
so the seam between prompt and answer never depends on BPE merges. Labels are -100 on prompts and
padding; the answer and the token that ends it are trained. Control tokens come from the template alone
(by id): the messages' text goes through tok.encode, where "<|end|>" typed by a user is text.

  miniglm   <|endoftext|> [<|system|> S <|end|>] <|user|> Q <|end|> <|assistant|> A <|end|> ...
  chatglm   ChatGLM-6B: [Round i]\\n问：…\\n答：… history in the prompt; prompt [gMASK] <sop> A <eop>
  chatglm2  ChatGLM2-6B: [gMASK] sop [Round 1]\\n\\n问：Q\\n\\n答： A </s>
  alpaca    Chinese-LLaMA/Alpaca: <s> "Below is an instruction… ### Instruction:\\nQ\\n\\n### Response: " A </s>
  plain     BLOOMZ/GPT/OPT (seed 002's twitter example): [S\n] "Tweet text : Q Label : " A <eos>; pads left
  chatml    Qwen: <|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n
  llama2    <s>[INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nQ [/INST] A </s>
  hf        the tokenizer's own chat_template (its prompt render must be a token prefix of the full one)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from miniglm.fileio import UserError
from miniglm.tokenizer import EOT, HFTokenizer, Tokenizer, check_text

IGNORE = -100
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")


@dataclass
class TemplateOptions:
    system: str | None = None  # a system prompt added when the chat has none
    train_all_turns: bool = True  # False: only the last assistant turn is trained
    prompt_field: str = "Question"  # plain: "{prompt_field} : {text} {label_field} : "
    label_field: str = "Answer"
    end_token: str = "eos"  # plain: the token after the target, eos or pad (seed 002's BLOOMZ example uses pad)
    max_source_len: int = 0  # chatglm/chatglm2: ChatGLM's max_source_length / max_target_length budgets
    max_target_len: int = 0


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]
    stop_ids: list[int]  # tokens that end an assistant turn at inference


class _Builder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], trained: bool = False) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if trained else [IGNORE] * len(ids))

    def done(self, stop_ids: list[int]) -> Rendered:
        return Rendered(self.ids, self.labels, stop_ids)


def _split(messages: list[dict], opts: TemplateOptions) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system, [(user, assistant or None), ...]) — the shape every template walks over."""
    system = opts.system
    turns: list[tuple[str, str | None]] = []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            turns.append((m["content"], None))
        elif m["role"] == "assistant":
            if not turns or turns[-1][1] is not None:
                raise UserError("an assistant turn must follow a user turn")
            turns[-1] = (turns[-1][0], m["content"])
        else:
            raise UserError(f"unknown role '{m['role']}' (expected system, user or assistant)")
    return system, turns


def _trained(i: int, turns: list, opts: TemplateOptions) -> bool:
    return opts.train_all_turns or i == len(turns) - 1


def _check_end(turns: list, add_generation_prompt: bool) -> None:
    if not turns:
        raise UserError("a chat needs at least one user turn")
    if add_generation_prompt and turns[-1][1] is not None:
        raise UserError("a generation prompt must end with a user turn")
    if not add_generation_prompt and turns[-1][1] is None:
        raise UserError("a training chat must end with an assistant turn")


def render_miniglm(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    end = tok.special("<|end|>")
    b = _Builder()
    b.add([tok.special(EOT)])
    if system:
        b.add([tok.special("<|system|>"), *tok.encode(system), end])
    for i, (q, a) in enumerate(turns):
        b.add([tok.special("<|user|>"), *tok.encode(q), end, tok.special("<|assistant|>")])
        if a is not None:
            b.add([*tok.encode(a), end], _trained(i, turns, opts))
    return b.done([end])


def _glm_prompt(turns, round_fmt: str, last_fmt: str, first_round: int) -> str:
    history = "".join(round_fmt.format(i + first_round, q, a) for i, (q, a) in enumerate(turns[:-1]))
    return history + last_fmt.format(len(turns) - 1 + first_round, turns[-1][0])


def render_chatglm(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    """ChatGLM-6B (ptuning's preprocess): only the last answer is trained; history lives in the prompt."""
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    if len(turns) == 1:
        prompt = turns[0][0]  # ChatGLM-6B's chat() uses the bare query when there is no history
    else:
        prompt = _glm_prompt(turns, "[Round {}]\n问：{}\n答：{}\n", "[Round {}]\n问：{}\n答：", 0)
    a_ids = tok.encode((system or "") + prompt)
    if opts.max_source_len:
        a_ids = a_ids[:opts.max_source_len - 1]
    b = _Builder()
    b.add([*a_ids, tok.special("[gMASK]")])
    b.add([tok.special("<sop>")], trained=not add_generation_prompt)  # ChatGLM labels <sop> too
    eop = tok.special("<eop>")
    if not add_generation_prompt:
        b_ids = tok.encode(turns[-1][1])
        if opts.max_target_len:
            b_ids = b_ids[:opts.max_target_len - 2]
        b.add([*b_ids, eop], trained=True)
    return b.done([eop])


def render_chatglm2(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    prompt = _glm_prompt(turns, "[Round {}]\n\n问：{}\n\n答：{}\n\n", "[Round {}]\n\n问：{}\n\n答：", 1)
    a_ids = [tok.special("[gMASK]"), tok.special("sop"), *tok.encode((system or "") + prompt)]
    if opts.max_source_len:
        a_ids = a_ids[:opts.max_source_len]
    b = _Builder()
    b.add(a_ids)
    if not add_generation_prompt:
        b_ids = tok.encode(turns[-1][1])
        if opts.max_target_len:
            b_ids = b_ids[:opts.max_target_len - 1]
        b.add([*b_ids, tok.eot_id], trained=True)
    return b.done([tok.eot_id])


def render_alpaca(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    b = _Builder()
    if tok.bos_id is not None:
        b.add([tok.bos_id])
    for i, (q, a) in enumerate(turns):
        preamble = (ALPACA_SYSTEM if system is None else system) if i == 0 else ""
        b.add(tok.encode(f"{preamble}### Instruction:\n{q}\n\n### Response: "))
        if a is not None:
            b.add([*tok.encode(a), tok.eot_id], _trained(i, turns, opts))
    return b.done([tok.eot_id])


def render_plain(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    end = tok.pad_id if opts.end_token == "pad" else tok.eot_id
    b = _Builder()
    if system:  # an instruction on its own line first ("Answer complaint or no complaint.\nTweet text : …")
        b.add(tok.encode(f"{system}\n"))
    for i, (q, a) in enumerate(turns):
        b.add(tok.encode(f"{opts.prompt_field} : {q} {opts.label_field} : "))
        if a is not None:
            b.add([*tok.encode(a), end], _trained(i, turns, opts))
    return b.done([end])


def render_chatml(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    start, end, newline = tok.special("<|im_start|>"), tok.special("<|im_end|>"), tok.encode("\n")
    b = _Builder()
    if system:
        b.add([start, *tok.encode(f"system\n{system}"), end, *newline])
    for i, (q, a) in enumerate(turns):
        b.add([start, *tok.encode(f"user\n{q}"), end, *newline, start, *tok.encode("assistant\n")])
        if a is not None:
            b.add([*tok.encode(a), end], _trained(i, turns, opts))
            b.add(newline)
    return b.done([end])


def render_llama2(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    b = _Builder()
    for i, (q, a) in enumerate(turns):
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}" if i == 0 and system else q
        b.add(([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(f"[INST] {content.strip()} [/INST]"))
        if a is not None:
            b.add([*tok.encode(f" {a.strip()} "), tok.eot_id], _trained(i, turns, opts))
    return b.done([tok.eot_id])


def render_hf(messages, tok: Tokenizer, add_generation_prompt: bool, opts: TemplateOptions) -> Rendered:
    """The tokenizer's chat_template. Each assistant turn's labels are the tokens between the render of
    the chat before it (with the generation prompt) and the render including it."""
    if not isinstance(tok, HFTokenizer) or not getattr(tok.tok, "chat_template", None):
        raise UserError(f"tokenizer {tok.name} has no chat_template; choose another --template")
    system, turns = _split(messages, opts)
    _check_end(turns, add_generation_prompt)
    msgs = [m for m in messages if m["role"] != "system"]
    if system:
        msgs = [{"role": "system", "content": system}, *msgs]

    check_text([m["content"] for m in msgs])  # the template renders text, not through tok.encode

    def ids_of(chat: list[dict], gen: bool) -> list[int]:
        # sanitize_control_tokens: control-token text in the messages is encoded as text; only the template's
        # own are tokens. A chat without any renders to the same ids as before.
        try:
            out = tok.tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                              sanitize_control_tokens=True)
        except ValueError as e:  # "Can't sanitize '<x>': the tokenizer produces it from plain text"
            raise UserError(f"tokenizer {tok.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ends = [tok.token_id(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>")]  # common end-of-turn tokens
    stop = sorted({tok.eot_id, *(i for i in ends if i is not None)})
    if add_generation_prompt:
        prompt = ids_of(msgs, True)
        return Rendered(prompt, [IGNORE] * len(prompt), stop)
    full = ids_of(msgs, False)
    labels = [IGNORE] * len(full)
    answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    for n, k in enumerate(answers):
        if not (opts.train_all_turns or n == len(answers) - 1):
            continue
        prompt, upto = ids_of(msgs[:k], True), ids_of(msgs[:k + 1], False)
        if full[:len(prompt)] != prompt or full[:len(upto)] != upto:
            raise UserError("the chat_template's prompt render is not a token prefix of the full render "
                            f"(assistant turn {n + 1}); use a template miniglm renders by segments")
        end = len(upto)  # train through the end-of-turn token, not the separator the template puts after it
        while end > len(prompt) and full[end - 1] not in stop:
            end -= 1
        end = end if end > len(prompt) else len(upto)
        labels[len(prompt):end] = full[len(prompt):end]
    return Rendered(full, labels, stop)


TEMPLATES: dict[str, Callable[..., Rendered]] = {
    "miniglm": render_miniglm, "chatglm": render_chatglm, "chatglm2": render_chatglm2, "alpaca": render_alpaca,
    "plain": render_plain, "chatml": render_chatml, "llama2": render_llama2, "hf": render_hf,
}
# Training pads right unless the family says otherwise (seed 002's BLOOMZ example pads left).
PADDING_SIDE = {"plain": "left"}


def render(template: str, messages: list[dict], tok: Tokenizer, add_generation_prompt: bool = False,
           opts: TemplateOptions | None = None) -> Rendered:
    if template not in TEMPLATES:
        raise UserError(f"unknown template '{template}' (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[template](messages, tok, add_generation_prompt, opts or TemplateOptions())


def end_of_turn_ids(template: str, tok: Tokenizer, opts: TemplateOptions | None = None) -> list[int]:
    """The tokens that end an assistant turn in this template, besides end-of-text: render's own stop
    ids, so exports stop where chat does. Empty when the tokenizer lacks the template's tokens."""
    try:
        stops = render(template, [{"role": "user", "content": "?"}], tok, True, opts).stop_ids
    except UserError:
        return []
    return [i for i in dict.fromkeys(stops) if i != tok.eot_id]


# Jinja chat templates for the layouts that Jinja expresses as they are, written into exported tokenizers
# so that transformers, vLLM and llama.cpp render chats as training did (tests compare them with render()).
# A system message is rendered where it stands (render moves it first), and "<|endoftext|>" in the text
# becomes the special token again when the exported tokenizer encodes it. Left out: the GLM templates
# (round numbers, [gMASK]), alpaca and llama2 (BOS per turn, strip()), plain (its field options); "hf"
# runs keep their tokenizer's own chat_template.
_JINJA = {
    "miniglm": ("<|endoftext|>DEFAULT_SYSTEM{% for m in messages %}{% if m['role'] == 'system' %}"
                "{% if m['content'] %}<|system|>{{ m['content'] }}<|end|>{% endif %}"
                "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|><|assistant|>"
                "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"),
    "chatml": ("DEFAULT_SYSTEM{% for m in messages %}{% if m['role'] != 'system' or m['content'] %}"
               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
_JINJA_SYSTEM = {"miniglm": "<|system|>{{ TEXT }}<|end|>", "chatml": "<|im_start|>system\n{{ TEXT }}<|im_end|>\n"}


def jinja_template(template: str, opts: TemplateOptions | None = None) -> str | None:
    """The template as a Jinja chat_template (with the run's default system prompt), or None where there is none."""
    if template not in _JINJA:
        return None
    default = ""
    if opts is not None and opts.system:  # render adds it when the chat has no system message
        literal = json.dumps(opts.system, ensure_ascii=False)  # a quoted, escaped Jinja string
        default = ("{% if not messages or messages[0]['role'] != 'system' %}"
                   + _JINJA_SYSTEM[template].replace("TEXT", literal) + "{% endif %}")
    return _JINJA[template].replace("DEFAULT_SYSTEM", default)
