"""Generation for HF runs: the engine interface (chat.DecodingEngine: generate, stream, prompt_room) over
transformers' model.generate.

Prompts are left-padded into one batch; transformers' generate() hands each step's new tokens to a
streamer, which turns them into Engine's (row, token) pairs, so per-row stopping, stop strings, UTF-8-safe
streaming and finish reasons are Engine's own code, called as functions on this engine (not inherited).
A whole batch (generate) decodes on the calling thread; a stream runs generate() in a worker thread and
yields each step as it comes.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from miniglm.devices import evaluating, model_device, resolve_device
from miniglm.engine import BOUNDARY, Completion, Engine, Row, SamplingParams, left_pad, mask_for
from miniglm.fileio import UserError
from miniglm.hf import HFCausalLM
from miniglm.tokenizer import Tokenizer


class _Steps:
    """A transformers streamer and a stopping criterion in one. Each step's new tokens go to on_tokens
    (called on generate()'s thread), which returns True once the reader has what it needs; generate() then
    stops at its next check."""

    def __init__(self, on_tokens: Callable[[list[int]], bool]) -> None:
        self.on_tokens = on_tokens
        self.halt = threading.Event()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
        elif self.on_tokens(value.view(-1).tolist()):
            self.halt.set()

    def end(self) -> None:  # the streamer's end of generation: the caller sees generate() return
        pass

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.halt.is_set(), dtype=torch.bool, device=input_ids.device)


class _ValidText:
    """A transformers logits processor: Engine's TextMask for generate(). It keeps each row's UTF-8 state on
    the device, advanced by the last token of input_ids at each call (the first call sees the prompt, which
    ends at a character boundary): one gather for the state, one gather and an add of -inf for the scores."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.states, self.next = tokenizer, None, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = mask_for(self.tokenizer, scores.size(-1))
        if self.states is None:
            self.next = mask.next.to(scores.device).long()
            self.states = torch.full((scores.size(0),), BOUNDARY, dtype=torch.long, device=scores.device)
        else:  # ids past the table (none unless the scores are wider than the tokenizer) resync to a boundary
            last = input_ids[:, -1]
            inside = last < self.next.size(1)
            self.states = torch.where(inside, self.next[self.states, last.clamp(max=self.next.size(1) - 1)], BOUNDARY)
        return scores + mask.table(scores.device)[self.states]


class HFEngine:
    """chat.DecodingEngine over transformers' generate(). Its own: how a batch of rows is decoded (steps,
    decode_all). Engine's, called as plain functions on this engine: fitting prompts to the context
    (start, _fit, prompt_room: they read model.config.block_size, tokenizer and text_mask), taking each
    step's tokens (_accept), and generate and stream, which drive steps and decode_all."""

    def __init__(self, model: HFCausalLM, tokenizer: Tokenizer, device: str | None = None):
        """Decodes the model where it is (device None), in eval mode while it decodes: the caller's model
        is left as it was. Another device decodes a copy there."""
        here = model_device(model)
        target = here if device is None else torch.device(resolve_device(device))
        self.model = model if target == here else copy.deepcopy(model).to(target)
        self.tokenizer, self.device = tokenizer, str(target)
        self.text_mask = None  # transformers' generate() samples: _ValidText masks its scores
        # The family's end tokens (gpt2-chinese's [SEP], Qwen's <|im_end|>) end an answer too.
        ends = [tokenizer.token_id(t) for t in model.family.end_tokens] + [tokenizer.eot_id]
        self.end_ids = {i for i in ends if i is not None}

    # --- Engine's row logic, on this engine ------------------------------------------------------------
    def prompt_room(self, max_new_tokens: int) -> int:
        return Engine.prompt_room(self, max_new_tokens)

    def start(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Row]:
        return Engine.start(self, prompts, params)

    def _fit(self, ids: list[int], params: SamplingParams) -> Row:  # Engine.start's per-prompt step
        return Engine._fit(self, ids, params)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        return Engine.generate(self, prompts, params)

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        return Engine.stream(self, prompt, params)

    # --- decoding through transformers' generate() ---------------------------------------------------
    def _generation_config(self, params: SamplingParams, stop_ids: set[int], max_new: int):
        from transformers import GenerationConfig

        sample = params.temperature > 0  # a fresh config: not the model's own sampling defaults
        return GenerationConfig(max_new_tokens=max_new, do_sample=sample,
                                temperature=params.temperature if sample else None,
                                top_k=params.top_k if sample else None, top_p=params.top_p if sample else None,
                                repetition_penalty=params.repetition_penalty, eos_token_id=sorted(stop_ids),
                                pad_token_id=self.tokenizer.pad_id)

    def _generate(self, rows: list[Row], params: SamplingParams, stop_ids: set[int], hooks: _Steps) -> None:
        """transformers' generate() over the rows' prompts, its steps through hooks; an error as a UserError."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        idx, mask = left_pad([r.prompt for r in rows], self.tokenizer.pad_id)
        if params.seed is not None:  # generate() samples from torch's global generator
            torch.manual_seed(params.seed)
        try:
            with evaluating(self.model):
                self.model.model.generate(input_ids=idx.to(self.device), attention_mask=mask.to(self.device),
                                          streamer=hooks, stopping_criteria=StoppingCriteriaList([hooks]),
                                          logits_processor=LogitsProcessorList([_ValidText(self.tokenizer)]),
                                          generation_config=self._generation_config(params, stop_ids,
                                                                                    max(r.max_new for r in rows)))
        except Exception as e:
            raise UserError(f"generation failed: {type(e).__name__}: {e}") from None

    def stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_ids) | self.end_ids

    def decode_all(self, rows: list[Row], params: SamplingParams) -> None:
        """Every row to its end, on this thread: a worker thread would run torch's ops through a second
        OpenMP thread pool, which on a 2-core machine costs every parallel op a kernel wake-up (Batcher)."""
        stop_ids = self.stop_ids(params)

        def take(tokens: list[int]) -> bool:
            Engine._accept(rows, tokens, stop_ids)
            return all(r.done for r in rows)
        self._generate(rows, params, stop_ids, _Steps(take))

    def steps(self, rows: list[Row], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        """Each step's (row, token) pairs as they come (stream): generate() runs in a worker thread."""
        stop_ids, tokens, errors = self.stop_ids(params), queue.Queue(), []

        def hand_over(step: list[int]) -> bool:
            tokens.put(step)
            return False  # the reader sets halt when it has what it needs
        hooks = _Steps(hand_over)

        def work() -> None:
            # One torch thread here: the caller's thread keeps its OpenMP pool (it loaded the model), and a
            # second pool beside it makes every parallel op wait on a kernel wake-up (see decode_all)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._generate(rows, params, stop_ids, hooks)
            except UserError as e:  # raised again in the reader's thread
                errors.append(e)
            finally:
                torch.set_num_threads(threads)
                tokens.put(None)

        worker = threading.Thread(target=work, name="miniglm-hf-generate", daemon=True)
        worker.start()
        try:
            while (step := tokens.get()) is not None:
                yield Engine._accept(rows, step, stop_ids)
                if all(r.done for r in rows):
                    break
        finally:
            hooks.halt.set()  # all rows done, or the reader left (a stop string, a closed stream)
            worker.join()
        if errors:
            raise errors[0]
