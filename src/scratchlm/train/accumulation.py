"""How much one optimizer step learns from: the training loop and the SFT epoch count both ask here.

A micro-batch is `train.micro_batch` rows (sequences) of `context` tokens on each of `world` processes.
`train.batch_tokens` asks for that many tokens per optimizer step, so the loop accumulates the gradients
of several micro-batches; the step then sees

    rows_per_step   = micro_batch * world * accumulation_steps   rows, and
    rows_per_step * context                                       tokens.
"""
from __future__ import annotations

from scratchlm.config import TrainConfig


def accumulation_steps(train: TrainConfig, context: int, world: int = 1) -> int:
    """Micro-batches per optimizer step: as many as fit in `train.batch_tokens` (at least one)."""
    if not train.batch_tokens:
        return 1
    return max(1, train.batch_tokens // (train.micro_batch * world * context))


def rows_per_step(train: TrainConfig, context: int, world: int = 1) -> int:
    """Rows (sequences) one optimizer step learns from, all processes together."""
    return train.micro_batch * world * accumulation_steps(train, context, world)
