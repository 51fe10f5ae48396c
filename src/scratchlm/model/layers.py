"""Normalisation layers and feed-forward blocks.

Each is a public module with stable parameter names (`weight`, `bias`, `up`, `gate`, `down`), so it can be
used, tested and converted on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped outright when it would do nothing: a one-token decoding step is mostly such
    small calls, and each costs about as much as the arithmetic around it."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Computed in float32 whatever the input dtype, because the mean of squares
    overflows or loses precision in 16-bit formats."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused kernel: one pass instead of five elementwise ones (a test holds it to the formula)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}")


# relu2 is ReLU squared (So et al. 2021, "Primer"), the MLP of the modded-nanogpt speedruns.
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
                "relu2": lambda x: F.relu(x).square(), "silu": F.silu}


class MLP(nn.Module):
    """Two-layer feed-forward block: down(act(up(x))). GELU uses the tanh approximation, as GPT-2 did;
    relu2 is relu(x)^2."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.act = _ACTIVATIONS[activation]
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.down(self.act(self.up(x))), self.dropout, self.training)


class SwiGLU(nn.Module):
    """Gated feed-forward block of Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.down(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training)


def make_mlp(kind: str, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias, dropout)
    return MLP(dim, hidden, kind, bias, dropout)
