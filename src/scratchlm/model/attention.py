"""Causal self-attention with grouped key/value heads (MHA, GQA, MQA) and a KV cache.

Two paths compute the same thing: PyTorch's fused `scaled_dot_product_attention` (flash attention on a
GPU) and an explicit one that writes the softmax out, which is easier to read and can hand back the
attention weights for plotting. A third, `triton`, is scratchlm's own FlashAttention-2 kernel
(model/flash_triton.py), for training on a GPU; where it cannot run, SDPA stands in, so such a model
still samples and converts on a CPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.layers import RMSNorm
from scratchlm.model.positions import alibi_bias, apply_rope


class KVCache:
    """Keys and values of the positions seen so far, for every layer. Sized by `n_kv_heads`, not by the
    number of query heads: that is the memory GQA and MQA save."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values after the cached ones and return everything up to them."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} asked for")
        keys, values = self.k[layer], self.v[layer]  # narrow() views: fewer calls than slicing four dimensions
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, bias: bool = False, dropout: float = 0.0,
                 qk_norm: bool = False, norm_eps: float = 1e-6, backend: str = "sdpa", value_embed: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.backend = backend
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        # With a value embedding, the values are a * v + b * ve, (a, b) learned; the Transformer sets them to
        # (0.5, 0.5) as modded-nanogpt does.
        self.value_mix = nn.Parameter(torch.empty(2)) if value_embed else None
        self.keep_weights = False  # set by the attention-map plot; only the explicit path can honour it
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, rope: tuple | None = None,
                alibi_slopes: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0, key_mask: torch.Tensor | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (B, keys so far), True where a key may be attended to: hides left padding.
        `value_embed` (B, T, n_kv_heads * head_dim), the new tokens' rows of this layer's value table, is
        mixed into the values before they are cached, so cached decoding sees what a full forward does."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x)
        if value_embed is not None:
            a, b = self.value_mix
            v = a * v + b * value_embed.to(v.dtype)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        elif self.backend == "triton" and key_mask is None and not self.keep_weights:
            # Our FlashAttention-2 kernel reads each query head's key/value head in place (no repeat). Cached
            # decoding and padding masks stay on SDPA: the kernel is tuned per length, for training.
            from scratchlm.model import flash_triton
            if flash_triton.runs_on(x.device):
                y = flash_triton.flash_attention(q, k, v, causal=True, alibi_slopes=alibi_slopes)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
            flash_triton.fallback_notice(x.device)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout if self.training else 0.0
        explicit = self.backend == "explicit" or self.keep_weights
        if alibi_slopes is None and key_mask is None and not explicit and (T == 1 or k.shape[2] == T):
            # Nothing to add to the scores: one new token sees every key (they are all in its past), and a
            # fresh sequence is plain causal. The common case, and the whole of a decoding step, goes
            # straight to the kernel without building positions or masks.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

        k_positions = torch.arange(k.shape[2], device=x.device) + (positions[0] - (k.shape[2] - T))
        bias = self._bias(positions, k_positions, alibi_slopes, x.dtype, force=key_mask is not None)
        if key_mask is not None:
            # A padding query may see itself, so that no row of the softmax is empty (that would be NaN).
            own = k_positions[None, :] == positions[:, None]
            hidden = ~(key_mask[:, None, :] | own[None])
            bias = bias[None].masked_fill(hidden[:, None], float("-inf"))
        if explicit:
            y = self._explicit(q, k, v, bias, dropout)
        else:
            if bias is None and T > 1:  # new tokens after cached ones: the causal mask is offset
                bias = self._bias(positions, k_positions, None, x.dtype, force=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    @staticmethod
    def _bias(q_pos, k_pos, slopes, dtype, force: bool = False) -> torch.Tensor | None:
        """Additive (H or 1, Tq, Tk) float mask: ALiBi's distance bias where asked, -inf on the future."""
        if slopes is None and not force:
            return None
        future = k_pos[None, :] > q_pos[:, None]
        if slopes is not None:
            bias = alibi_bias(slopes.to(q_pos.device), q_pos, k_pos)
        else:
            bias = torch.zeros(future.shape, device=q_pos.device)[None]
        return bias.masked_fill(future[None], float("-inf")).to(dtype)

    def _explicit(self, q, k, v, bias, dropout) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        Tq, Tk = scores.shape[-2:]
        if bias is None:
            future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)
            scores = scores.masked_fill(future, float("-inf"))
        else:
            scores = scores + bias.float()
        weights = scores.softmax(dim=-1)
        if self.keep_weights:
            self.last_weights = weights.detach()
        weights = F.dropout(weights, dropout, training=dropout > 0)
        return weights.type_as(v) @ v
