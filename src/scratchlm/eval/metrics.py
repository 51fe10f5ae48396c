"""Validation loss, perplexity and bits per byte.

Bits per byte divides the total information of the targets by the UTF-8 bytes they decode to, so models
with different tokenizers (or none) can be compared: a model that predicts text perfectly scores 0, one
that knows nothing about English scores 8.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from scratchlm.data.loader import sequential_windows


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: list[np.ndarray], token_bytes: torch.Tensor, *, context: int,
             batch: int = 16, max_tokens: int = 0, device: torch.device | str = "cpu", autocast=None) -> dict:
    """Mean loss (nats per token), perplexity and bits per byte over the shards' every target, or over
    the first `max_tokens` targets."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    nats, targets, n_bytes = 0.0, 0, 0
    budget = max_tokens
    for shard in shards:
        for x, y in sequential_windows(shard, context, batch, budget):
            x, y = x.to(device), y.to(device)
            with autocast() if autocast else torch.no_grad():
                logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            targets += y.numel()
            n_bytes += int(token_bytes[y].sum())
        if max_tokens:
            budget = max_tokens - targets
            if budget <= 0:
                break
    model.train(was_training)
    loss = nats / max(1, targets)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_bpb": nats / math.log(2) / max(1, n_bytes),
            "val_tokens": targets, "val_bytes": n_bytes}
