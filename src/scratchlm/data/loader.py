"""Batches of token windows for training and evaluation.

Training draws windows at random offsets from memory-mapped shards with its own generator, whose state
goes into each checkpoint: a resumed run draws exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from scratchlm.errors import UserError


class RandomWindows:
    """Endless (x, y) batches of `context` tokens, y being x shifted by one, at uniform random offsets."""

    reshapes = True   # next_batch takes each batch's rows and window length (train/accumulation.py)

    def __init__(self, shards: list[np.ndarray], context: int, batch: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1):
        # A window is context + 1 tokens (inputs and targets shifted by one), so a shard of that length
        # gives one window and a shard of n tokens gives n - context.
        self.shards = [s for s in shards if len(s) > context]
        if not self.shards:
            longest = max(map(len, shards), default=0)
            raise UserError(f"no training shard holds context + 1 = {context + 1} tokens (the longest has "
                            f"{longest}); use a smaller model.context or more training text")
        self.context, self.batch, self.device = context, batch, torch.device(device)
        # Every process draws the whole global batch from the same generator and keeps its own slice:
        # the data seen does not depend on how many processes share it, and neither does a checkpoint.
        self.rank, self.world = rank, world
        # Offsets are counted over all shards at once; a window never crosses two shards.
        self.starts = np.cumsum([0] + [len(s) - context for s in self.shards])
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, rows: int = 0, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` rows (0: `batch`) of `window` tokens (0: `context`) on this process. A shorter window
        is the start of the full one the same draw would give."""
        rows, window = rows or self.batch, window or self.context
        if window > self.context:
            raise ValueError(f"a window of {window} tokens is longer than the context, {self.context}")
        picks = torch.randint(int(self.starts[-1]), (rows * self.world,), generator=self.generator)
        picks = picks[self.rank * rows:(self.rank + 1) * rows].tolist()
        batch = []
        for p in picks:
            i = bisect.bisect_right(self.starts, p) - 1
            off = p - self.starts[i]
            batch.append(np.asarray(self.shards[i][off:off + window + 1], dtype=np.int64))
        data = torch.from_numpy(np.stack(batch))
        if self.device.type == "cuda":
            data = data.pin_memory().to(self.device, non_blocking=True)
        else:
            data = data.to(self.device)
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def sequential_windows(tokens: np.ndarray, context: int, batch: int, max_tokens: int = 0):
    """Every token after the first is a target exactly once: windows of context + 1 tokens with stride
    `context`, the last one shorter. Yields (x, y) of shape (b, t); the last batches may be smaller."""
    n = len(tokens) if not max_tokens else min(len(tokens), max_tokens + 1)
    starts = list(range(0, n - 1, context))
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        lengths = {min(context, n - 1 - s) for s in group}
        for length in sorted(lengths, reverse=True):
            rows = [np.asarray(tokens[s:s + length + 1], dtype=np.int64) for s in group if min(context, n - 1 - s) == length]
            data = torch.from_numpy(np.stack(rows))
            yield data[:, :-1], data[:, 1:]


class SlidingWindowDataset(torch.utils.data.Dataset):
    """A map-style dataset of (x, y) windows of `context` tokens every `stride` tokens, for use with a
    `DataLoader`. Stride equal to the context gives disjoint windows; a smaller one, overlapping ones."""

    def __init__(self, tokens, context: int, stride: int):
        if stride < 1:
            raise ValueError("stride must be at least 1")
        self.tokens, self.context, self.stride = tokens, context, stride
        self.n = max(0, (len(tokens) - context - 1) // stride + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.as_tensor(np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]
