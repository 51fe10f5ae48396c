"""The ways in to generation: new token ids for one prompt (`stream`, `generate`), or the text that
continues one prompt or several (`complete`, `complete_batch`). Each runs the model in eval mode and
gives it back in the mode it came in. The decoding is in `decoder.py`, the text in `text.py`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from scratchlm.infer.decoder import BatchDecoder
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.text import TextBatch
from scratchlm.runtime import eval_mode


def stream(model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one at a time; stops after `max_new_tokens` or at a stop id (not yielded)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    with eval_mode(model):
        decoder = BatchDecoder(model, [prompt], params)
        while not decoder.done:
            for _, t, _ in decoder.step():
                if t is not None:
                    yield t


def generate(model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    return list(stream(model, prompt, params))


@dataclass
class Completion:
    text: str
    finish_reason: str          # "stop" (a stop id or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int      # tokens generated, including any that hold the stop string


def complete_batch(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
    """The whole completion of each prompt, as text without any stop string."""
    pieces: list[list[str]] = [[] for _ in prompts]
    with eval_mode(model):
        batch = TextBatch(model, tokenizer, prompts, params)
        while not batch.done:
            for r, piece, _ in batch.step():
                pieces[r].append(piece)
    return [Completion("".join(pieces[r]), batch.finish_reason(r) or "length", len(p), batch.completion_tokens(r))
            for r, p in enumerate(prompts)]


def complete(model: torch.nn.Module, tokenizer, prompt: Sequence[int], params: SamplingParams) -> Completion:
    return complete_batch(model, tokenizer, [prompt], params)[0]
