"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.model.positions import LearnedPositions
from scratchlm.runtime import multiplies_bf16_natively

# Keller Jordan's quintic for Muon: one polynomial a x + b x^3 + c x^5, applied at every step.
QUINTIC = (3.4445, -4.775, 2.0315)

# The Polar Express polynomials of degree 5 as published in Amsel, Persson, Musco and Gower (2025), "The
# Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932,
# Algorithm 1: the t-th is the odd quintic closest to 1 (in the worst case) on the interval the singular
# values occupy after t - 1 steps, starting from [1e-3, 1]. From the eighth on they stay at the last one
# (numerically the classical degree-5 Newton-Schulz polynomial, (15x - 10x^3 + 3x^5) / 8).
POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety factor: every polynomial but the last is evaluated at x / 1.01, so a singular value
# that rounding (bfloat16) pushed a little past the interval a polynomial was fitted on is still mapped
# near 1 rather than overshooting; the input is divided by 1.01 times its Frobenius norm for the same reason.
SAFETY = 1.01

POLYNOMIALS = ("quintic", "polar-express")
NORMALIZATIONS = ("none", "neuron")


def polynomial_steps(polynomial: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations x <- a x + b x^3 + c x^5."""
    if polynomial == "quintic":
        return [QUINTIC] * steps
    if polynomial != "polar-express":
        raise ValueError(f"unknown polynomial {polynomial!r}; known: {', '.join(POLYNOMIALS)}")
    safe = [(a / SAFETY, b / SAFETY ** 3, c / SAFETY ** 5) for a, b, c in POLAR_EXPRESS[:-1]]
    safe.append(POLAR_EXPRESS[-1])
    return [safe[min(i, len(safe) - 1)] for i in range(steps)]


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  polynomial: str = "quintic") -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T, by `steps` odd quintic polynomials applied to the
    singular values; for a stack of matrices (..., rows, cols), of each one.

    "quintic": the coefficients (3.4445, -4.775, 2.0315) at every step push every singular value of the
    normalised matrix towards one in five steps, accepting values anywhere near 1 (roughly 0.7 to 1.2) in
    exchange for speed; for an optimizer that is as good as the exact polar factor.
    "polar-express": a different polynomial at each step, each the best in the worst case for where the
    previous ones left the singular values (see POLAR_EXPRESS), so five steps land closer to 1 than five
    of the fixed quintic, from singular values as small as 1e-3 of the Frobenius norm.

    Iterating on the wide orientation keeps the Gram matrix small."""
    x = g.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)  # spectral <= Frobenius norm: dividing by it puts x in the basin
    x = x / norm.clamp(min=1e-7) if polynomial == "quintic" else x / (norm * SAFETY + 1e-7)
    for a, b, c in polynomial_steps(polynomial, steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's step (Li et al. 2025, "NorMuon", arXiv:2510.05491) on an orthogonalised update (..., rows,
    cols): each row (an output neuron's weights) is divided by the root of an exponential moving average of
    its mean squared entry, `second_moment` (..., rows, 1), float32, updated in place; then the whole
    matrix is scaled back to the update's Frobenius norm.

    An orthogonalised update gives every direction the same size but not every neuron: this evens out the
    neurons while keeping Muon's step size. No bias correction is needed: it would scale every row alike,
    which the rescaling undoes."""
    u = update.float()
    second_moment.lerp_(u.square().mean(dim=-1, keepdim=True), 1 - beta2)
    evened = u / (second_moment.sqrt() + 1e-10)
    evened = evened * (u.norm(dim=(-2, -1), keepdim=True) / (evened.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    return evened.to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D weight matrices.

    Each step keeps a momentum buffer of the gradients, orthogonalises the (Nesterov) momentum, so that
    every direction of the update moves by the same amount, and applies it scaled by sqrt(max(1, rows /
    cols)) so tall and wide matrices get updates of comparable size.

    Weight decay is decoupled, as in AdamW: before the update, each matrix is multiplied by
    1 - lr * weight_decay, with the group's own lr (Muon's, not AdamW's).

    `polynomial` picks the orthogonalising iteration (see `orthogonalize`); `normalize="neuron"` evens out
    the rows of the orthogonalised update (NorMuon, see `normalize_neurons`) with a second-moment average
    of decay `beta2`, kept per matrix as the state slot "neuron_second_moment".

    Matrices of the same shape are orthogonalised together, as one stack: a small model's dozens of small
    products become a few batched ones. The iteration runs in bfloat16 where the hardware multiplies it
    (a GPU, a CPU with AMX or AVX-512 BF16: `ns_dtype=None`), as PyTorch's own `torch.optim.Muon` always
    does, and in float32 elsewhere, where bfloat16 products are emulated and about a hundred times slower.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 polynomial: str = "quintic", normalize: str = "none", beta2: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        if polynomial not in POLYNOMIALS:
            raise ValueError(f"unknown polynomial {polynomial!r}; known: {', '.join(POLYNOMIALS)}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalize!r}; known: {', '.join(NORMALIZATIONS)}")
        # Choices of the algorithm rather than per-group settings: not in param_groups, so a checkpoint
        # written before they existed still loads.
        self.ns_dtype, self.polynomial, self.normalize, self.beta2 = ns_dtype, polynomial, normalize, beta2
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if multiplies_bf16_natively(device) else torch.float32

    def _normalized(self, params: list[torch.Tensor], updates: torch.Tensor) -> torch.Tensor:
        moments = []
        for p in params:
            state = self.state[p]
            if "neuron_second_moment" not in state:
                state["neuron_second_moment"] = torch.zeros(p.shape[0], 1, dtype=torch.float32, device=p.device)
            moments.append(state["neuron_second_moment"])
        stacked = torch.stack(moments)
        updates = normalize_neurons(updates, stacked, self.beta2)
        for moment, new in zip(moments, stacked):
            moment.copy_(new)
        return updates

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
                updates = orthogonalize(torch.stack([d for _, d in pairs]), group["ns_steps"], dtype, self.polynomial)
                if self.normalize == "neuron":
                    updates = self._normalized([p for p, _ in pairs], updates)
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


KINDS = ("embedding", "head", "matrix", "scalar")


def classify(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, str]]:
    """Each trainable parameter once (a tied head is its token table), in the model's order, with its kind:

    - "scalar": fewer than two dimensions (norm gains, biases, mixing weights), whatever module holds it;
    - "embedding": a lookup table, the weight of any nn.Embedding (token table, value embeddings) or of
      learned positions;
    - "head": the output layer, `model.lm_head`, unless it is tied to the token table;
    - "matrix": the rest, the maps between hidden states.

    By module type, so a table added under any name is an embedding."""
    tables = {id(p) for m in model.modules() if isinstance(m, (torch.nn.Embedding, LearnedPositions))
              for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    heads = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    kinds = []
    for p in model.parameters():  # a parameter shared by two modules comes once
        if not p.requires_grad:
            continue
        kind = ("scalar" if p.dim() < 2 else "embedding" if id(p) in tables else "head" if id(p) in heads
                else "matrix")
        kinds.append((p, kind))
    return kinds


def param_groups(kinds: list[tuple[torch.nn.Parameter, str]], cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: each kind's lr as a multiple of train.lr ("lr_scale", which `set_lr` reads) and
    weight decay on matrices and tables only (decaying gains and biases toward zero only fights the
    normalisation they exist for). Kinds with the same settings share a group, so with every scale at 1
    there are two, decayed and not."""
    settings = {"embedding": (cfg.embed_lr_scale, cfg.weight_decay), "head": (cfg.head_lr_scale, cfg.weight_decay),
                "matrix": (1.0, cfg.weight_decay), "scalar": (cfg.scalar_lr_scale, 0.0)}
    groups = {settings[kind]: {"params": [], "lr": cfg.lr * settings[kind][0], "lr_scale": settings[kind][0],
                               "weight_decay": settings[kind][1]} for kind in KINDS}
    for p, kind in kinds:
        groups[settings[kind]]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW for everything (train.optimizer = adamw), or Muon for the 2-D hidden matrices and AdamW for
    the rest (muon). Each kind of parameter (see `classify`) learns at its own multiple of train.lr: the
    tables embed_lr_scale, the head head_lr_scale, the scalars scalar_lr_scale, the hidden matrices 1 under
    AdamW and muon_lr_scale under Muon, so one schedule drives them all."""
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

    kinds = classify(model)
    if cfg.optimizer == "adamw":
        return adamw(param_groups(kinds, cfg))
    if cfg.optimizer != "muon":
        raise UserError(f"train.optimizer = {cfg.optimizer!r} is not one of adamw, muon")
    hidden = [p for p, kind in kinds if kind == "matrix" and p.dim() == 2]
    taken = {id(p) for p in hidden}
    muon = Muon(hidden, lr=cfg.lr * cfg.muon_lr_scale, weight_decay=cfg.muon_decay, momentum=cfg.muon_momentum,
                polynomial=cfg.muon_polynomial, normalize=cfg.muon_normalize)
    for g in muon.param_groups:
        g["lr_scale"] = cfg.muon_lr_scale
    return Combined(muon, adamw(param_groups([(p, kind) for p, kind in kinds if id(p) not in taken], cfg)))


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
