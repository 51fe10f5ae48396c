"""Readable versions of the three numerical pieces of a training step, for learning and for checking:
AdamW, cross-entropy and gradient-norm clipping. `train.implementation = "reference"` trains with them;
PyTorch's fused versions stay the default because they are faster. Tests hold the two to float tolerance.
"""
from __future__ import annotations

import math

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean negative log-probability of the targets. (N, V) logits, (N,) targets.

    log softmax is computed as x - max - log(sum(exp(x - max))): subtracting the row maximum keeps exp()
    from overflowing without changing the result."""
    keep = targets != ignore_index
    logits, targets = logits[keep].float(), targets[keep]
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
    return -log_probs.gather(1, targets[:, None]).mean()


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients together so their joint L2 norm is at most `max_norm`; return the norm before."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
    if math.isfinite(max_norm):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)
    return total


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter, 2019).

    Per parameter: m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 are running averages of the gradient
    and its square; dividing by 1 - b^t undoes their bias toward zero in the first steps. The step is
    lr * m_hat / (sqrt(v_hat) + eps): about lr in size whatever the gradient's scale. Weight decay
    shrinks the weight itself by lr * wd, apart from the gradient, so it does not get rescaled by v."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(-group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))
