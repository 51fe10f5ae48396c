"""What a model costs: parameters, FLOPs per token, KV-cache and training memory, from its config alone."""
from __future__ import annotations

import torch

from scratchlm.config import ModelConfig
from scratchlm.model.transformer import Transformer


def count_params(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):  # shapes only: a 1B model costs no memory here
        model = Transformer(cfg)
    total = model.num_params()
    return {"total": total, "embedding": total - model.num_params(embeddings=False),
            "non_embedding": model.num_params(embeddings=False)}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward and backward): 6 per weight of every matrix product, the output
    head included, plus the attention scores and weighted sum, 12 * layers * d_model * T (PaLM, appendix B),
    counted over the full T x T square as the published MFU figures do."""
    T = seq_len or cfg.context
    params = count_params(cfg)
    matmul_weights = params["non_embedding"] - _vector_params(cfg)
    if cfg.tie_embeddings:
        matmul_weights += cfg.vocab_size * cfg.d_model
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.d_model * T


def _vector_params(cfg: ModelConfig) -> int:
    """Norm gains and biases, which take part in no matrix product."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters() if p.dim() < 2)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * bytes_per_value


def training_memory_bytes(cfg: ModelConfig) -> int:
    """Weights, gradients and AdamW's two moments, all float32: 16 bytes per parameter, activations not
    included (they depend on the batch and on activation checkpointing)."""
    return 16 * count_params(cfg)["total"]


def _speedrun_options(cfg: ModelConfig) -> str:
    on = [f"logit soft-cap {cfg.logit_softcap:g}" if cfg.logit_softcap else "",
          f"{cfg.value_embeds} value embeddings" if cfg.value_embeds else "",
          "U-net skips" if cfg.unet_skips else "", "zero-init projections" if cfg.zero_init_proj else ""]
    return "".join(f", {o}" for o in on if o)


def describe(cfg: ModelConfig) -> str:
    p = count_params(cfg)
    gib = 1024 ** 3
    lines = [
        f"preset            {cfg.preset or '(custom)'}",
        f"shape             d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({cfg.kv_heads} kv), ffn {cfg.ffn_hidden}, context {cfg.context}, vocab {cfg.vocab_size}",
        f"choices           {cfg.position} positions, {cfg.norm} ({'pre' if cfg.pre_norm else 'post'}-norm), "
        f"{cfg.mlp} MLP, tied embeddings {'on' if cfg.tie_embeddings else 'off'}{_speedrun_options(cfg)}",
        f"parameters        {p['total']:,} ({p['embedding']:,} embedding, {p['non_embedding']:,} non-embedding)",
        f"FLOPs per token   {flops_per_token(cfg):,.0f} (training, forward + backward, at context {cfg.context})",
        f"KV cache          {kv_cache_bytes_per_token(cfg):,} bytes per token in bf16 "
        f"({kv_cache_bytes_per_token(cfg) * cfg.context / 2**20:.1f} MiB for a full context)",
        f"AdamW training    {training_memory_bytes(cfg) / gib:.2f} GiB for weights, gradients and moments in float32 "
        f"(plus activations)",
    ]
    return "\n".join(lines)
