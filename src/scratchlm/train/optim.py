"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.runtime import multiplies_bf16_natively


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


def muon_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The hidden weight matrices: Muon orthogonalises updates of maps between hidden states. Embedding
    tables and the output layer are lookups and a classifier, where it does not apply."""
    lookups = {id(p) for name, m in model.named_modules() if name in ("tok_emb", "pos_emb", "lm_head")
               for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in lookups]


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T, by a quintic Newton-Schulz iteration; for a stack of
    matrices (..., rows, cols), of each one.

    The coefficients (3.4445, -4.775, 2.0315) push every singular value of the normalised matrix towards
    one in five steps, accepting values anywhere near 1 (roughly 0.7 to 1.2) in exchange for speed; for an
    optimizer that is as good as the exact polar factor. Iterating on the wide orientation keeps the Gram
    matrix small."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral <= Frobenius norm <= 1: in the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D weight matrices.

    Each step keeps a momentum buffer of the gradients, orthogonalises the (Nesterov) momentum, so that
    every direction of the update moves by the same amount, and applies it scaled by sqrt(max(1, rows /
    cols)) so tall and wide matrices get updates of comparable size. Weight decay is decoupled, as in AdamW.

    Matrices of the same shape are orthogonalised together, as one stack: a small model's dozens of small
    products become a few batched ones. The iteration runs in bfloat16 where the hardware multiplies it
    (a GPU, a CPU with AMX or AVX-512 BF16: `ns_dtype=None`), as PyTorch's own `torch.optim.Muon` always
    does, and in float32 elsewhere, where bfloat16 products are emulated and about a hundred times slower.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if multiplies_bf16_natively(device) else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            same_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                direction = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                same_shape.setdefault((p.shape, p.dtype, p.device), []).append((p, direction))
            for (shape, _, device), pairs in same_shape.items():
                dtype = self._ns_dtype(device)
                updates = orthogonalize(torch.stack([d for _, d in pairs]), group["ns_steps"], dtype)
                scale = -lr * math.sqrt(max(1.0, shape[0] / shape[1]))
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update, alpha=scale)


class Combined:
    """Several optimizers over disjoint parameters, stepped as one. Checkpoints save and load the `parts`
    through parameter names (see train.distributed), so they do not care how many there are."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    # The fused kernel is the fastest on GPU; on CPU the multi-tensor ("foreach") path is.
    fused = device.type == "cuda"
    if cfg.implementation not in ("torch", "reference"):
        raise UserError(f"train.implementation = {cfg.implementation!r} is not one of torch, reference")
    if cfg.implementation == "reference":
        from scratchlm.train.reference import AdamW as ReferenceAdamW

        def adamw(groups):
            return ReferenceAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    else:
        def adamw(groups):
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)

    if cfg.optimizer == "adamw":
        return adamw(param_groups(model, cfg.weight_decay))
    if cfg.optimizer != "muon":
        raise UserError(f"train.optimizer = {cfg.optimizer!r} is not one of adamw, muon")
    hidden = muon_params(model)
    taken = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # Muon's lr is given relative to AdamW's, so one schedule drives both ("lr_scale" below); the
    # shape adjustment keeps the update size comparable across rectangular matrices.
    muon = Muon(hidden, lr=cfg.lr * cfg.muon_lr_scale, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    for g in muon.param_groups:
        g["lr_scale"] = cfg.muon_lr_scale
    return Combined(muon, adamw([g for g in groups if g["params"]]))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
