"""The training loss, fused with the output head: cross-entropy of `hidden @ weight.T` against the
targets, computed a slice of rows at a time.

Computing the logits whole and handing them to `F.cross_entropy` keeps a (tokens, vocab) table alive
until the backward pass, and writes three more of the same size (log-softmax, its gradient, the zeros
the gradient is scattered into). Here each slice's logits become their own gradient in place
(softmax minus one at the target) as soon as the slice's loss is known, and are folded straight into
the gradients of `hidden` and `weight`; the backward pass only scales those by the incoming gradient.
Peak memory drops from a few (tokens, vocab) tables to one slice, and on a CPU, where those tables are
memory traffic and page faults, the step gets faster too (bench/model.py).

A soft cap (`softcap` > 0, as in Gemma 2 and the modded-nanogpt speedruns) squashes each logit into
(-cap, cap) by cap * tanh(logit / cap); it is applied slice by slice here too, and its derivative,
1 - tanh^2, is folded into each slice's gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # as F.cross_entropy: targets with this value add nothing to the loss

# Elements in one slice of logits: a few MB stays in a CPU's cache; on a GPU, larger slices keep the
# products big enough to fill it.
_SLICE_ELEMENTS = {"cpu": 1 << 22}
_DEFAULT_SLICE_ELEMENTS = 1 << 26


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): near the identity for small logits, never beyond +-cap."""
    return cap * torch.tanh(logits / cap)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, cap: float):
        dtype = _compute_dtype(hidden.device, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            exact = torch.promote_types(dtype, torch.float32)  # softmax sums in float32 at least
            counted = targets != IGNORE_INDEX
            n = counted.sum().clamp(min=1)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
            total = torch.zeros((), device=hidden.device, dtype=exact)
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(dtype)
                t = targets[start:start + rows]
                keep = counted[start:start + rows]
                safe = torch.where(keep, t, 0)[:, None]
                logits = (h @ w.t()).to(exact)
                if cap:  # in place: tanh(z / cap), its slope 1 - tanh^2, then the capped logits
                    squashed = logits.div_(cap).tanh_()
                    slope = squashed.square().neg_().add_(1)
                    logits = squashed.mul_(cap)
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, safe)[:, 0]) * keep).sum()
                # d loss / d logits of a counted row is softmax - onehot(target), over the count
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
                probs.mul_((keep.to(exact) / n)[:, None])
                if cap:
                    probs.mul_(slope)
                g = probs.to(dtype)
                grad_hidden[start:start + rows] = g @ w
                if g.dtype == grad_weight.dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += g.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None, cap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (hidden: (N, d), weight: (vocab, d),
    targets: (N,)), leaving out targets equal to IGNORE_INDEX, as `F.cross_entropy` does; with `cap` > 0,
    of the soft-capped logits `softcap(hidden @ weight.T, cap)`. `rows` per slice defaults to a few
    million logits' worth."""
    if rows is None:
        rows = max(1, _SLICE_ELEMENTS.get(hidden.device.type, _DEFAULT_SLICE_ELEMENTS) // weight.shape[0])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Nothing to differentiate: the plain slices, no gradients computed ahead.
        exact = torch.promote_types(hidden.dtype, torch.float32)
        total, count = hidden.new_zeros((), dtype=exact), (targets != IGNORE_INDEX).sum()
        for start in range(0, hidden.shape[0], rows):
            logits = F.linear(hidden[start:start + rows], weight).to(exact)
            if cap:
                logits = softcap(logits, cap)
            total = total + F.cross_entropy(logits, targets[start:start + rows], reduction="sum")
        return total / count.clamp(min=1)
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows, cap)
