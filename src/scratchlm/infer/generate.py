"""Sampling from a model with a KV cache: greedy, temperature, top-k and top-p, seeded, streaming.

Past the model's context, the cache is refilled with the most recent three quarters of the context, so
generation can run on for as long as asked with any position scheme.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 1.0     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0           # 1: off
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def stream(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one at a time; stops after `max_new_tokens` or at a stop id (not yielded)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = model.config.context
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    keep = max(1, context * 3 // 4)
    tokens = list(prompt[-context:])
    cache = model.new_cache(1, context)
    try:
        logits = model(torch.tensor([tokens], device=device), cache=cache)[:, -1]
        for _ in range(params.max_new_tokens):
            nxt = int(sample_next(logits, params, generator))
            if nxt in params.stop_ids:
                return
            yield nxt
            tokens.append(nxt)
            if cache.length >= context:
                cache.reset()
                tokens = tokens[-keep:]
                logits = model(torch.tensor([tokens], device=device), cache=cache)[:, -1]
            else:
                logits = model(torch.tensor([[nxt]], device=device), cache=cache)[:, -1]
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> list[int]:
    return list(stream(model, prompt, params))


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive, holding back bytes that do not yet form a whole UTF-8 character."""
    pending: list[int] = []
    for i in ids:
        pending.append(i)
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):
            yield text
            pending = []
    if pending:
        yield tokenizer.decode(pending)
