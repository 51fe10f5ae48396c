"""Schedules, optimizer groups, evaluation arithmetic and sampling filters, against values worked by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import TrainConfig, build_config
from scratchlm.data.loader import RandomWindows, SlidingWindowDataset, sequential_windows
from scratchlm.eval.metrics import IGNORE, evaluate, evaluate_batches
from scratchlm.infer.generate import generate
from scratchlm.infer.sampling import SamplingParams, sample_next
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import build_optimizer, lr_at


def test_schedules_by_hand():
    c = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 110, c) == pytest.approx(0.1)
    assert lr_at(9, 110, c) == pytest.approx(1.0)
    assert lr_at(60, 110, c) == pytest.approx(0.55)          # halfway down the cosine
    assert lr_at(110, 110, c) == pytest.approx(0.1)
    c.schedule = "linear"
    assert lr_at(60, 110, c) == pytest.approx(0.55)
    c.schedule, c.cooldown_steps = "wsd", 20
    assert lr_at(80, 110, c) == pytest.approx(1.0)
    assert lr_at(100, 110, c) == pytest.approx(1.0 - 0.9 * 10 / 20)
    c.schedule = "constant"
    assert lr_at(100, 110, c) == 1.0


def test_weight_decay_only_on_matrices():
    shape = {"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2, "bias": True}
    model = Transformer(build_config({"model": shape}).model)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_sequential_windows_cover_every_target_once():
    tokens = np.arange(23)
    targets = [t for _, y in sequential_windows(tokens, 5, 2) for t in y.flatten().tolist()]
    assert targets == list(range(1, 23))
    for x, y in sequential_windows(tokens, 5, 3):
        assert torch.equal(x + 1, y)


def test_sliding_window_dataset_stride():
    ds = SlidingWindowDataset(np.arange(20), context=4, stride=3)
    assert len(ds) == 6
    x, y = ds[1]
    assert x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]


def test_random_windows_resume_draws_the_same_batches():
    shard = np.arange(1000, dtype=np.uint16)
    a = RandomWindows([shard], 8, 4, seed=3)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()
    b = RandomWindows([shard], 8, 4, seed=99)
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(got[0] + 1, got[1])


class Uniform(torch.nn.Module):
    """A model that knows nothing: equal logits for every token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


def test_bits_per_byte_by_hand():
    vocab = 16
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    token_bytes = torch.tensor([0] + [2] * 15)   # every ordinary token is two bytes
    row = evaluate(Uniform(vocab), [tokens], token_bytes, context=4, batch=2)
    # 10 targets, each costs log2(16) = 4 bits and decodes to 2 bytes: 40 bits / 20 bytes.
    assert row["val_tokens"] == 10 and row["val_bytes"] == 20
    assert row["val_loss"] == pytest.approx(math.log(16))
    assert row["val_ppl"] == pytest.approx(16)
    assert row["val_bpb"] == pytest.approx(2.0)


class Repeater(torch.nn.Module):
    """Bets on the next token repeating the current one: probability 1/2 for it, 1/6 for each of the
    other three of four tokens. Records whether it ran in eval mode."""

    def forward(self, idx):
        self.seen_training = self.training
        return F.one_hot(idx, 4).float() * math.log(3)


def test_masked_targets_are_left_out_of_loss_tokens_and_bytes():
    token_bytes = torch.tensor([1, 2, 3, 4])
    x = torch.tensor([[1, 2, 3], [0, 0, 0]])
    y = torch.tensor([[1, IGNORE, 0], [IGNORE, IGNORE, 0]])   # a repeat (ln 2 nats), a change (ln 6), a repeat
    model = Repeater().train()
    row = evaluate_batches(model, [(x, y)], token_bytes)
    assert row["val_tokens"] == 3 and row["val_bytes"] == 2 + 1 + 1
    assert row["val_loss"] == pytest.approx((2 * math.log(2) + math.log(6)) / 3)
    assert row["val_bpb"] == pytest.approx((2 * math.log(2) + math.log(6)) / math.log(2) / 4)
    assert not model.seen_training and model.training   # scored in eval mode, handed back in training mode
    # with max_tokens, the batch that reaches it is the last one scored
    assert evaluate_batches(model, [(x, y)] * 3, token_bytes, max_tokens=4)["val_tokens"] == 6


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sample_next(logits, SamplingParams(temperature=0), None).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert picks == {1, 2}
    # softmax([1,3,2,0]) = [.087, .644, .237, .032]: top_p 0.7 keeps the two best (0.644 < 0.7).
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), g).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g).item() for _ in range(50)}
    assert picks == {1}


def test_generation_is_seeded_and_runs_past_the_context():
    cfg = build_config({"model": {"vocab_size": 40, "context": 16, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                  "position": "learned"}}).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)
    a, b = generate(model, [1, 2, 3], params), generate(model, [1, 2, 3], params)
    assert a == b and len(a) == 50
    greedy = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0))
    ids = [1, 2, 3]
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[3:]


def test_orthogonalize_gives_the_polar_factor_up_to_near_one_singular_values():
    from scratchlm.train.optim import orthogonalize

    torch.manual_seed(0)
    for shape in [(48, 32), (32, 48), (40, 40)]:
        k = min(shape)
        u = torch.linalg.qr(torch.randn(shape[0], k)).Q
        vh = torch.linalg.qr(torch.randn(shape[1], k)).Q.T
        g = 7 * u @ torch.diag(torch.linspace(0.1, 1, k)) @ vh  # singular values spread tenfold
        core = u.T @ orthogonalize(g) @ vh.T  # diagonal when the update shares g's singular vectors
        off = core - torch.diag(torch.diagonal(core))
        assert off.abs().max() < 1e-4
        assert 0.6 < torch.diagonal(core).min() and torch.diagonal(core).max() < 1.25
        # a stack is orthogonalised matrix by matrix, each scaled by its own norm (the first tenfold)
        stacked = orthogonalize(torch.stack([10 * g, g.flip(0)]))
        torch.testing.assert_close(stacked[0], orthogonalize(g), atol=1e-5, rtol=0)
        torch.testing.assert_close(stacked[1], orthogonalize(g.flip(0)), atol=1e-5, rtol=0)


def test_muon_step_matches_pytorch_muon():
    from scratchlm.train.optim import Muon

    torch.manual_seed(0)
    w = torch.randn(64, 40)
    for ns_dtype in (torch.float32, None):  # None: bfloat16 where the CPU multiplies it, else float32
        # two matrices of one shape, orthogonalised as a stack, and one of another shape
        ours_w = [w.clone().requires_grad_(), (w + 1).requires_grad_(), w[:30].clone().requires_grad_()]
        torch_w = [t.detach().clone().requires_grad_() for t in ours_w]
        ours = Muon(ours_w, lr=0.02, weight_decay=0.1, momentum=0.95, ns_dtype=ns_dtype)
        ref = torch.optim.Muon(torch_w, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
        for _ in range(4):
            for a, b in zip(ours_w, torch_w):
                a.grad = torch.randn(a.shape)
                b.grad = a.grad.clone()
            ours.step()
            ref.step()
        for start, a, b in zip((w, w + 1, w[:30]), ours_w, torch_w):
            moved = (b - start).abs().max()
            # PyTorch iterates in bfloat16 (8 bits of mantissa): equal to bfloat16's precision
            assert (a - b).abs().max() < 0.03 * moved


def test_reference_cross_entropy_and_clipping_match_pytorch():
    from scratchlm.train import reference

    torch.manual_seed(0)
    logits = torch.randn(50, 11) * 30  # large enough that a naive exp() would overflow in float16
    targets = torch.randint(0, 11, (50,))
    targets[::7] = -100
    assert torch.allclose(reference.cross_entropy(logits, targets), F.cross_entropy(logits, targets), atol=1e-5)

    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 4
        q.grad = p.grad.clone()
    for max_norm in (1.0, 1e9):
        ours, theirs = reference.clip_grad_norm(a, max_norm), torch.nn.utils.clip_grad_norm_(b, max_norm)
        assert torch.allclose(ours, theirs, rtol=1e-5)
        assert all(torch.allclose(p.grad, q.grad, rtol=1e-5) for p, q in zip(a, b))


def test_reference_adamw_matches_pytorch():
    from scratchlm.train.reference import AdamW

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]

    opt_a = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_b = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(20):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p) * (step + 1)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ours, theirs))


def test_bf16_native_precision_follows_the_hardware_and_bad_values_name_the_choices(monkeypatch):
    from scratchlm.errors import UserError
    from scratchlm.runtime import autocast_for, compute_dtype

    cpu = torch.device("cpu")
    assert compute_dtype(cpu, "auto") == torch.float32 and autocast_for(cpu, "fp32") is None
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        assert compute_dtype(cpu, "bf16-native") == (torch.bfloat16 if native else torch.float32)
    with autocast_for(cpu, "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(UserError, match="bf16-native"):
        compute_dtype(cpu, "half")
