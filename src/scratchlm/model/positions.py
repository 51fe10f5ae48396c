"""Position schemes: learned and sinusoidal (added to the token embeddings), RoPE (rotates queries and
keys inside attention), ALiBi (a linear bias on the attention scores) and NoPE (nothing at all)."""
from __future__ import annotations

import math

import torch
from torch import nn

ADDITIVE = ("learned", "sinusoidal")
ALL = ("learned", "sinusoidal", "rope", "alibi", "nope")


class LearnedPositions(nn.Module):
    def __init__(self, context: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(context, dim))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


def sinusoidal_table(n: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The table of "Attention Is All You Need": sin on even channels, cos on odd ones."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed, so it is computed for any position asked for and extrapolates past the training context."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        n = int(positions.max()) + 1
        return sinusoidal_table(n, self.dim, self.base).to(positions.device)[positions]


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim/2) for the given absolute positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, head_dim) tables `apply_rope` works with: cos over both halves, and sin negated on the
    first half. The model builds them once per forward pass and every layer reuses them."""
    cos, sin = rope_angles(positions, head_dim, base)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by the position's angle: the "rotate half" layout of GPT-NeoX and
    Llama, so weights convert to Hugging Face without permuting. Takes the tables of `rope_tables`, or the
    half-width ones of `rope_angles`.

    Rolling x by d/2 swaps its halves, [x1, x2] -> [x2, x1], so x * cos + roll(x) * sin is
    [x1 cos - x2 sin, x2 cos + x1 sin] in four whole-tensor operations, and as many backward; slicing the
    halves apart costs about three times that in a training step, where these are memory-bound."""
    d = x.shape[-1] // 2
    if cos.shape[-1] == d:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    xf = x if x.dtype == torch.float32 else x.float()
    return torch.addcmul(xf * cos, xf.roll(d, dims=-1), sin).type_as(x)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of the ALiBi paper: a geometric sequence starting at 2^(-8/n). For a head count that is
    not a power of two, take the slopes of the closest smaller power of two, then every other slope of
    the next power of two, as the paper's reference code does."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(H, Tq, Tk) bias: -slope * distance to each earlier key; future keys are masked by the caller."""
    distance = (k_pos[None, :] - q_pos[:, None]).float()
    return slopes[:, None, None] * distance[None, :, :]
