"""Inference on a run: load its model, tokenizer and chat template; `miniglm generate` and `miniglm chat`.

A run fine-tuned with SFT has chat.json naming its template; prompts are rendered with that very
template function. A run without one (pretraining only) continues raw text. A run decodes through a
DecodingEngine: Engine for MiniGLM, HFEngine for a Hugging Face model. generate_batched is the one loop
over batches of prompts (`miniglm generate`, `miniglm eval`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol

import torch

from miniglm import runs
from miniglm.devices import resolve_device
from miniglm.engine import Completion, Engine, SamplingParams
from miniglm.fileio import UserError
from miniglm.sft.templates import TemplateOptions, render
from miniglm.tokenizer import Tokenizer


class DecodingEngine(Protocol):
    """What running a run asks of its engine, written once: Engine (MiniGLM, engine.py) and HFEngine
    (transformers, hf_engine.py) both implement it. The server needs more (Engine's forward_step for
    its Batcher) and serves MiniGLM runs alone."""

    model: torch.nn.Module  # its config.block_size is the context
    tokenizer: Tokenizer
    device: str

    def prompt_room(self, max_new_tokens: int) -> int:
        """The prompt tokens a trimmed prompt keeps."""
        ...

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per tokenised prompt, decoded as one batch."""
        ...

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """One completion's text, chunk by chunk, as it is decoded."""
        ...


@dataclass
class LoadedRun:
    engine: DecodingEngine
    template: str | None
    options: TemplateOptions
    name: str

    def prompt(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a chat ready for the assistant's answer, and the ids that end that answer."""
        if self.template is None:  # a base model: continue the text of the last message
            return self.engine.tokenizer.encode(messages[-1]["content"]), [self.engine.tokenizer.eot_id]
        r = render(self.template, messages, self.engine.tokenizer, add_generation_prompt=True, opts=self.options)
        return r.ids, r.stop_ids

    def fitted(self, messages: list[dict], max_len: int, keep_end: bool) -> tuple[list[int], list[int], bool]:
        """The prompt within max_len tokens, cut in the text, never in what the template adds (role tokens,
        the system prompt, a tail such as " Label : "): the oldest history turns go first, then the last
        user turn's text loses its start (keep_end: a chat's latest words matter) or its end (as `sft
        prepare` fits records). (ids, stop ids, cut?)"""
        ids, stops = self.prompt(messages)
        if len(ids) <= max_len:
            return ids, stops, False
        while len(ids) > max_len and sum(m["role"] == "user" for m in messages) > 1:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            nxt = next(i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user")
            messages = messages[:first] + messages[nxt:]
            ids, stops = self.prompt(messages)
        if len(ids) <= max_len:
            return ids, stops, True
        content = messages[-1]["content"]

        def with_text(n: int) -> list[int]:  # the last turn with n characters of its text
            text = content[len(content) - n:] if keep_end else content[:n]
            return self.prompt([*messages[:-1], {**messages[-1], "content": text}])[0]

        lo, hi = 0, len(content)  # the most text that fits (0 if none: the engine then says why)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(with_text(mid)) <= max_len:
                lo = mid
            else:
                hi = mid - 1
        return with_text(lo), stops, True

    def room(self, params: SamplingParams) -> int:
        """The prompt tokens a trimmed prompt keeps (as the engine trims raw ids)."""
        return self.engine.prompt_room(params.max_new_tokens)


def load_run(run: str | Path, device: str = "auto", raw: bool = False, int8: bool = False,
             compile: bool = False) -> LoadedRun:
    """A run opened by miniglm.runs (files checked), ready to decode: a MiniGLM with Engine, a Hugging
    Face run (`miniglm finetune`) with HFEngine, the same interface over transformers' generate()."""
    opened = runs.open_run(run)
    chat = None if raw else runs.read_chat(opened.dir)
    device = resolve_device(device)
    if opened.hf:
        from miniglm.hf_engine import HFEngine

        if int8 or compile:
            raise UserError(f"--{'int8' if int8 else 'compile'} is for MiniGLM runs; this run is a Hugging Face model")
        engine = HFEngine(runs.load_model(opened).to(device), runs.load_run_tokenizer(opened))
    else:
        tok = runs.load_run_tokenizer(opened, runs.read_model_config(opened.ckpt).vocab_size)  # before the weights
        engine = Engine(runs.load_model(opened), tok, device, int8, compile=compile)  # a decoding copy on device
    template, options = chat if chat is not None else (None, TemplateOptions())
    return LoadedRun(engine, template, options, opened.name)


def generate_batched(run: LoadedRun, prompts: Iterable[tuple[list[int], list[int]]], params: SamplingParams,
                     batch_size: int, note: Callable[[str], None] | None = None) -> Iterator[Completion]:
    """The completion of each prompt (its token ids, and the ids that end its answer), in order, batch by
    batch: a batch's stop ids are its prompts' and params'. prompts are read a batch at a time, so a lazy
    iterable is rendered as it goes. note is told once, at the first batch whose answers were capped to
    the room the context leaves (params.fit_new_tokens)."""
    noted, prompts = False, iter(prompts)
    while rendered := list(islice(prompts, batch_size)):
        stop = sorted({s for _, stops in rendered for s in stops} | set(params.stop_ids))
        # The seed as it is: each row draws from its own generator, so an answer does not depend on its batch
        batch_params = SamplingParams(**{**params.__dict__, "stop_ids": stop})
        outs = run.engine.generate([ids for ids, _ in rendered], batch_params)
        if note and not noted and any(o.capped for o in outs):
            note(f"--max-new-tokens {params.max_new_tokens} is past the room the context of "
                 f"{run.engine.model.config.block_size} tokens leaves; answers capped to fit")
            noted = True
        yield from outs


def generate_texts(run: LoadedRun, texts: list[str], params: SamplingParams, batch_size: int = 8,
                   system: str | None = None, warn: Callable[[str], None] | None = None) -> Iterator[dict]:
    """One completion per text (a user message, or raw text for a base model), batched; each batch is
    yielded as it finishes. With params.fit_new_tokens a prompt gets as many new tokens as its context
    leaves (warn says so once, when that is fewer than asked)."""
    def rendered(text: str) -> tuple[list[int], list[int]]:
        chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        # --trim-prompt cuts the start of the text, never the template's tokens nor the system prompt
        return run.fitted(chat, run.room(params), keep_end=True)[:2] if params.trim_prompt else run.prompt(chat)

    outs = generate_batched(run, map(rendered, texts), params, batch_size, warn)
    for text, out in zip(texts, outs, strict=True):
        yield {"prompt": text, "output": out.text, "finish_reason": out.finish_reason,
               "prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.ids)}


def chat_repl(run: LoadedRun, params: SamplingParams, read: Callable[[str], str] = input,
              write: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush())) -> None:
    """A multi-turn chat: history rendered with the run's template; /reset, /system TEXT, /exit."""
    write(f"chatting with {run.name} ({run.template or 'raw text'}); /reset, /system TEXT, /exit\n")
    system: str | None = None
    history: list[dict] = []
    while True:
        try:
            line = read("你: ").strip()
        except EOFError:
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            write(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
            continue
        # The oldest exchanges are forgotten before the room for an answer gets small; past the context even
        # alone, the message keeps its end (the template's tokens and the system prompt stay whole)
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, stops, _ = run.fitted([*messages, {"role": "user", "content": line}], run.room(params), keep_end=True)
        turn_params = SamplingParams(**{**params.__dict__, "stop_ids": sorted(set(stops) | set(params.stop_ids)),
                                        "fit_new_tokens": True})
        write("模型: ")
        answer = ""
        for chunk in run.engine.stream(ids, turn_params):
            answer += chunk
            write(chunk)
        write("\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
