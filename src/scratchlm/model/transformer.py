"""The decoder-only transformer: token embeddings, a stack of blocks, a final norm and the output head.

It knows nothing of devices, precision or parallelism; the training code wraps it from outside.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.model.attention import CausalSelfAttention, KVCache
from scratchlm.model.layers import dropout, make_mlp, make_norm
from scratchlm.model.loss import linear_cross_entropy, softcap
from scratchlm.model.positions import LearnedPositions, SinusoidalPositions, alibi_slopes, rope_tables


def value_table(cfg: ModelConfig, layer: int) -> int | None:
    """Which value-embedding table feeds `layer`, if any: table k feeds layer k and its mirror, n_layers-1-k."""
    k = min(layer, cfg.n_layers - 1 - layer)
    return k if k < cfg.value_embeds else None


class Block(nn.Module):
    """Attention then feed-forward, each inside a residual connection. Pre-norm normalises the input of
    each branch (stable at depth); post-norm normalises after the sum, as the 2017 transformer did."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, bias=cfg.bias, dropout=cfg.dropout,
                                        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, backend=cfg.attention,
                                        value_embed=value_table(cfg, layer) is not None)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.ffn_hidden, cfg.bias, cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, positions: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.pre_norm:
            x = x + dropout(self.attn(self.attn_norm(x), positions, **attn_kwargs), self.dropout, self.training)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + dropout(self.attn(x, positions, **attn_kwargs), self.dropout, self.training))
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_emb = LearnedPositions(cfg.context, cfg.d_model)
        elif cfg.position == "sinusoidal":
            self.pos_emb = SinusoidalPositions(cfg.d_model)
        else:
            self.pos_emb = None
        self.dropout = cfg.dropout
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Extra token tables whose rows are mixed into the attention values (modded-nanogpt's value
        # embeddings): a per-token bias of what each early and late layer reads, at no matrix-product cost.
        kv_width = cfg.kv_heads * cfg.head_dim
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_width) for _ in range(cfg.value_embeds))
        # U-net skips: block n_layers-1-k also reads the output of block k, weighted by skip_weights[k].
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layers // 2)) if cfg.unet_skips else None
        # Post-norm blocks already end in a norm; a final one is only needed for pre-norm.
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; the projections that write into the residual stream are
        scaled down by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth (GPT-2), or
        start at zero with `zero_init_proj`. Gains and skip weights start at one, biases at zero, and the
        value-embedding mix at (0.5, 0.5), as modded-nanogpt starts it."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down.weight"))
                if residual and self.config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    scale = 1 / math.sqrt(2 * self.config.n_layers) if residual else 1
                    nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("value_mix"):
                nn.init.constant_(p, 0.5)
            else:
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pad: torch.Tensor | None = None,
                last_only: bool = False, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T), or (B, 1, vocab) for the last position alone with
        `last_only`. With a cache, `idx` continues the cached sequence. Given `targets` (B, T), the mean
        cross-entropy instead, with the output head fused into the loss so that the logits are never held
        whole (model/loss.py); targets of -100 are left out, as in `F.cross_entropy`.

        `pad` (B,) counts the padding tokens at the start of each row, so prompts of different lengths can
        share a batch: keys in those slots are hidden and the added position tables count from each row's
        first real token. RoPE and ALiBi depend only on distances, which left padding does not change."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if self.pos_emb is not None and isinstance(self.pos_emb, LearnedPositions) and start + T > self.config.context:
            raise ValueError(f"learned positions stop at {self.config.context}; got position {start + T - 1}")
        positions = torch.arange(start, start + T, device=idx.device)
        key_mask = None
        if pad is not None:
            pad = pad.to(idx.device)
            key_mask = torch.arange(start + T, device=idx.device)[None, :] >= pad[:, None]
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            table_positions = positions if pad is None else (positions[None, :] - pad[:, None]).clamp(min=0)
            x = x + self.pos_emb(table_positions).to(x.dtype)
        x = dropout(x, self.dropout, self.training)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_base) if self.config.position == "rope" else None
        values = [table(idx) for table in self.value_embeds]
        n, skips = len(self.blocks), []
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= n - len(self.skip_weights):
                x = x + self.skip_weights[n - 1 - i] * skips[n - 1 - i]
            k = value_table(self.config, i)
            x = block(x, positions, rope=rope, alibi_slopes=self.alibi_slopes, cache=cache, layer=i,
                      key_mask=key_mask, value_embed=None if k is None else values[k])
            if self.skip_weights is not None and i < len(self.skip_weights):
                skips.append(x)
        if cache is not None:
            cache.advance(T)
        if last_only:  # a prompt's prefill needs only the next token's logits, not a vocabulary row per position
            x = x[:, -1:]
        x = self.final_norm(x)
        cap = self.config.logit_softcap
        if targets is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), cap=cap)
        logits = self.lm_head(x)
        return softcap(logits, cap) if cap else logits

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        p = self.tok_emb.weight
        return KVCache(cfg.n_layers, batch, cfg.kv_heads, max_len or cfg.context, cfg.head_dim,
                       device=p.device, dtype=dtype or p.dtype)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once even when tied; without embeddings means without the token, value and
        position tables (the output head still counts when it is not tied)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + sum(t.weight.numel() for t in self.value_embeds)
            if isinstance(self.pos_emb, LearnedPositions):
                n -= self.pos_emb.weight.numel()
        return n
