"""Validation loss, perplexity and bits per byte.

Bits per byte divides the total information of the targets by the UTF-8 bytes they decode to, so models
with different tokenizers (or none) can be compared: a model that predicts text perfectly scores 0, one
that knows nothing about English scores 8.

One scorer, `evaluate_batches`, serves pretraining (every target of the validation text) and fine-tuning
(only the answers: the other targets are IGNORE), so both report the same numbers the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from scratchlm.data.loader import sequential_windows
from scratchlm.runtime import eval_mode

IGNORE = -100   # a target that is not scored (F.cross_entropy's default ignore_index)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     token_bytes: torch.Tensor, *, max_tokens: int = 0, device: torch.device | str = "cpu",
                     autocast: Callable | None = None) -> dict:
    """Mean loss (nats per target), perplexity and bits per byte over the targets of `batches` of
    (inputs, targets) that are not IGNORE; with `max_tokens`, stop after the batch that reaches it."""
    token_bytes = token_bytes.to(device)
    nats, targets, n_bytes = 0.0, 0, 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast() if autocast else torch.no_grad():
                logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                    reduction="sum").item()
            scored = y[y != IGNORE]
            targets += scored.numel()
            n_bytes += int(token_bytes[scored].sum())
            if max_tokens and targets >= max_tokens:
                break
    loss = nats / max(1, targets)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_bpb": nats / math.log(2) / max(1, n_bytes),
            "val_tokens": targets, "val_bytes": n_bytes}


def evaluate(model: torch.nn.Module, shards: list[np.ndarray], token_bytes: torch.Tensor, *, context: int,
             batch: int = 16, max_tokens: int = 0, device: torch.device | str = "cpu", autocast=None) -> dict:
    """`evaluate_batches` over the shards' every target, or over their first `max_tokens` targets."""
    return evaluate_batches(model, _windows(shards, context, batch, max_tokens), token_bytes,
                            max_tokens=max_tokens, device=device, autocast=autocast)


def _windows(shards: list[np.ndarray], context: int, batch: int, max_tokens: int) -> Iterator:
    """The shards' windows one after the other, cut at exactly `max_tokens` targets (0: all)."""
    left = max_tokens
    for shard in shards:
        for x, y in sequential_windows(shard, context, batch, left):
            yield x, y
            if max_tokens:
                left -= y.numel()
        if max_tokens and left <= 0:
            return
