"""Generation for HF runs: the Engine interface (generate, stream) over transformers' model.generate.

Prompts are left-padded into one batch; generate() runs in a worker thread and hands each step's new
tokens to a streamer, and `steps` turns those into Engine's (row, token) pairs, so per-row stopping,
stop strings, UTF-8-safe streaming and finish reasons are Engine's own code.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from miniglm.engine import Engine, Row, SamplingParams, left_pad
from miniglm.fileio import UserError
from miniglm.hf import HFCausalLM
from miniglm.tokenizer import Tokenizer


class _Steps:
    """A transformers streamer (each step's new tokens into a queue) and a stopping criterion (the
    reader has what it needs) in one."""

    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()
        self.halt = threading.Event()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.tokens.put(value.view(-1).tolist())

    def end(self) -> None:
        self.tokens.put(None)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.halt.is_set(), dtype=torch.bool, device=input_ids.device)


class HFEngine(Engine):
    def __init__(self, model: HFCausalLM, tokenizer: Tokenizer, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer, self.device = tokenizer, device
        # The family's end tokens (gpt2-chinese's [SEP], Qwen's <|im_end|>) end an answer too.
        ends = [tokenizer.token_id(t) for t in model.family.end_tokens] + [tokenizer.eot_id]
        self.end_ids = {i for i in ends if i is not None}

    def _generation_config(self, params: SamplingParams, stop_ids: set[int], max_new: int):
        from transformers import GenerationConfig

        sample = params.temperature > 0  # a fresh config: not the model's own sampling defaults
        return GenerationConfig(max_new_tokens=max_new, do_sample=sample,
                                temperature=params.temperature if sample else None,
                                top_k=params.top_k if sample else None, top_p=params.top_p if sample else None,
                                repetition_penalty=params.repetition_penalty, eos_token_id=sorted(stop_ids),
                                pad_token_id=self.tokenizer.pad_id)

    def steps(self, rows: list[Row], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        from transformers import StoppingCriteriaList

        idx, mask = left_pad([r.prompt for r in rows], self.tokenizer.pad_id)
        stop_ids = set(params.stop_ids) | self.end_ids
        hooks, errors = _Steps(), []
        kwargs = {"input_ids": idx.to(self.device), "attention_mask": mask.to(self.device), "streamer": hooks,
                  "generation_config": self._generation_config(params, stop_ids, max(r.max_new for r in rows)),
                  "stopping_criteria": StoppingCriteriaList([hooks])}
        if params.seed is not None:  # generate() samples from torch's global generator
            torch.manual_seed(params.seed)

        def work() -> None:
            try:
                self.model.model.generate(**kwargs)
            except Exception as e:  # raised again in the reader's thread
                errors.append(e)
            finally:
                hooks.end()

        worker = threading.Thread(target=work, name="miniglm-hf-generate", daemon=True)
        worker.start()
        try:
            while (tokens := hooks.tokens.get()) is not None:
                yield self._accept(rows, tokens, stop_ids)
                if all(r.done for r in rows):
                    break
        finally:
            hooks.halt.set()  # all rows done, or the reader left (a stop string, a closed stream)
            worker.join()
        if errors:
            raise UserError(f"generation failed: {type(errors[0]).__name__}: {errors[0]}")
