"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embedding tables) only: decaying gains and biases toward zero only
    fights the normalisation they exist for."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # The fused kernel is the fastest on GPU; on CPU the multi-tensor ("foreach") path is.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for a 0-based step of a run of `total` steps: linear warmup, then the schedule down
    to `lr * min_lr_ratio` at the last step."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak - (peak - floor) * progress
    if cfg.schedule == "wsd":
        cooldown = cfg.cooldown_steps or max(1, int(0.2 * total))
        decay_start = total - cooldown
        if step < decay_start:
            return peak
        return peak - (peak - floor) * min(1.0, (step - decay_start) / cooldown)
    raise UserError(f"train.schedule = {cfg.schedule!r} is not one of cosine, wsd, linear, constant")
