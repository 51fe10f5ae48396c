"""The output head fused with cross-entropy, against F.linear + F.cross_entropy (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import build_config
from scratchlm.model.loss import IGNORE_INDEX, linear_cross_entropy
from scratchlm.model.transformer import Transformer


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).to(torch.promote_types(hidden.dtype, torch.float32)), targets)


def grads(loss_fn, hidden, weight, targets, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows", [1, 7, 64, None])
def test_loss_and_gradients_equal_cross_entropy_over_the_logits(rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 24, dtype=torch.float64), torch.randn(31, 24, dtype=torch.float64)
    targets = torch.randint(0, 31, (50,))
    targets[[3, 17, 18, 49]] = IGNORE_INDEX
    ours = grads(lambda h, w, t: linear_cross_entropy(h, w, t, rows=rows), hidden, weight, targets, scale=2.5)
    theirs = grads(reference, hidden, weight, targets, scale=2.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-10, atol=1e-12)


def test_without_gradients_it_gives_the_same_value_and_all_ignored_gives_zero():
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(20, 8), torch.randn(11, 8), torch.randint(0, 11, (20,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, rows=3),
                                   reference(hidden, weight, targets))
    none = torch.full((20,), IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, none)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


def test_model_loss_with_targets_matches_its_logits_for_tied_and_untied_heads():
    for tied in (True, False):
        cfg = build_config({"model": {"vocab_size": 53, "context": 16, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                      "tie_embeddings": tied}}).model
        torch.manual_seed(2)
        x, y = torch.randint(0, 53, (3, 16)), torch.randint(0, 53, (3, 16))
        y[0, :5] = IGNORE_INDEX
        results = []
        for fused in (True, False):
            torch.manual_seed(3)
            model = Transformer(cfg)
            loss = model(x, targets=y) if fused else F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        for name, g in results[0][1].items():
            torch.testing.assert_close(g, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_autocast_keeps_float32_gradients_close_to_the_float32_loss():
    torch.manual_seed(4)
    hidden, weight, targets = torch.randn(40, 16), torch.randn(29, 16), torch.randint(0, 29, (40,))
    exact = grads(reference, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda h, w, t: linear_cross_entropy(h, w, t, rows=16), hidden, weight, targets)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)
