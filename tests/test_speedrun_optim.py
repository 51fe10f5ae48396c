"""The speedrun's optimizer options (issue #18): Polar Express orthogonalisation, NorMuon's per-neuron
normalisation, Muon's own weight decay, and learning rates per kind of parameter. Each is checked against
a reference built here: the exact polar factor from an SVD, the scalar polynomials the iteration applies to
singular values, a step worked out by hand, parameter kinds listed by name, an uninterrupted run."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_run
from tiny_chat import one_thread, tiny_model
from safetensors.torch import load_file
from torch import nn

from scratchlm import rundir
from scratchlm.config import TrainConfig, build_config, load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import (POLAR_EXPRESS, Muon, build_optimizer, orthogonalize, polynomial_steps,
                                   set_lr)
from scratchlm.train.pretrain import pretrain

F64 = torch.float64


# a. Polar Express

# Amsel, Persson, Musco and Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to
# the Muon Algorithm" (arXiv:2505.16932, 2025), Algorithm 1: the degree-5 coefficients (a, b, c) of
# a x + b x^3 + c x^5, typed from the paper, and its safety factor 1.01 on all but the last.
PUBLISHED = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def compose(x: torch.Tensor, coefficients) -> torch.Tensor:
    for a, b, c in coefficients:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def test_polar_express_coefficients_are_the_published_ones():
    assert list(POLAR_EXPRESS) == PUBLISHED
    safe = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in PUBLISHED[:-1]] + [PUBLISHED[-1]]
    assert polynomial_steps("polar-express", 10) == safe[:8] + [PUBLISHED[-1]] * 2
    assert polynomial_steps("quintic", 3) == [(3.4445, -4.775, 2.0315)] * 3
    # The last one is the classical degree-5 Newton-Schulz polynomial (15 x - 10 x^3 + 3 x^5) / 8.
    assert PUBLISHED[-1] == (15 / 8, -10 / 8, 3 / 8)
    # What makes them optimal, and what a mistyped digit breaks: composed, the first five map [1e-3, 1]
    # onto [1 - E, 1 + E] with the error E reached at both ends (equioscillation), E about 0.124.
    y = compose(torch.logspace(-3, 0, 200_001, dtype=F64), PUBLISHED[:5])
    low, high = y.min().item(), y.max().item()
    assert abs((1 - low) - (high - 1)) < 1e-6 and 0.12 < high - 1 < 0.125


def with_spectrum(shape: tuple[int, int], singular: torch.Tensor, seed: int = 0):
    """A matrix of the given singular values and random singular vectors, and its polar factor U V^T."""
    gen = torch.Generator().manual_seed(seed)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=F64)).Q
    vh = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=F64)).Q.T
    return u @ torch.diag(singular) @ vh, u @ vh


def spectral_error(x: torch.Tensor, polar: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.to(F64) - polar, ord=2).item()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
@pytest.mark.parametrize("condition", ["well", "ill"])
def test_polar_express_approaches_the_exact_polar_factor(shape, condition):
    k = min(shape)
    if condition == "well":
        singular = torch.linspace(0.5, 1, k, dtype=F64)
    else:
        # the paper's regime: after division by the Frobenius norm, singular values in [1e-3, 1]
        singular = torch.logspace(-2.5, 0, k, dtype=F64)   # condition number 316
        assert (singular / singular.norm()).min() > 1e-3
    g, polar = with_spectrum(shape, 30 * singular)
    # the exact polar factor, from torch's SVD rather than from the construction
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(u @ vh, polar, atol=1e-9, rtol=0)
    for dtype in (F64, torch.float32):
        express = orthogonalize(g.to(dtype), 5, dtype, "polar-express")
        quintic = orthogonalize(g.to(dtype), 5, dtype, "quintic")
        error = spectral_error(express, polar)
        # 0.16: the worst case of the five safe polynomials composed on [1e-3, 1] (divided by 1.01)
        assert error < (0.135 if condition == "well" else 0.165)
        assert error <= spectral_error(quintic, polar)
    # Each singular value goes through the polynomials alone: the matrix iteration equals the scalar one.
    steps = polynomial_steps("polar-express", 5)
    expected = compose(30 * singular / (g.norm() * 1.01 + 1e-7), steps)
    got = torch.linalg.svdvals(orthogonalize(g, 5, F64, "polar-express"))
    torch.testing.assert_close(got.sort().values, expected.sort().values, atol=1e-10, rtol=0)


def test_polar_express_is_no_worse_than_the_quintic_far_outside_its_regime():
    g, polar = with_spectrum((40, 24), torch.logspace(-6, 0, 24, dtype=F64))
    assert spectral_error(orthogonalize(g, 5, F64, "polar-express"), polar) <= \
        spectral_error(orthogonalize(g, 5, F64, "quintic"), polar)


# b. NorMuon, worked by hand

def hand_step(w, rows, moments, polynomial, lr, wd, beta2):
    """One Muon step with NorMuon on a 2x3 matrix whose direction `rows` has orthogonal rows, in scalars.

    Rows that are orthogonal make the SVD plain: the singular values are the row norms n_i and the update
    is row i's unit vector times p(n_i / norm), p the composed polynomial, norm the Frobenius norm (times
    1.01, plus 1e-7, for Polar Express)."""
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    frob = math.sqrt(sum(n * n for n in norms))
    if polynomial == "polar-express":
        frob = frob * 1.01 + 1e-7
    sizes = []
    for n in norms:
        x = n / frob
        for a, b, c in polynomial_steps(polynomial, 5):
            x = a * x + b * x ** 3 + c * x ** 5
        sizes.append(x)
    update = [[v / n * s for v in row] for row, n, s in zip(rows, norms, sizes)]
    # per row: the mean of squares (a unit row times s has s^2 / 3), averaged over steps
    moments = [beta2 * m + (1 - beta2) * sum(v * v for v in row) / 3 for m, row in zip(moments, update)]
    evened = [[v / (math.sqrt(m) + 1e-10) for v in row] for row, m in zip(update, moments)]
    size = math.sqrt(sum(v * v for row in update for v in row))
    new_size = math.sqrt(sum(v * v for row in evened for v in row))
    step = [[v * size / (new_size + 1e-10) for v in row] for row in evened]
    # wide (2 rows, 3 columns): sqrt(max(1, 2/3)) = 1, no shape factor
    return [[p * (1 - lr * wd) - lr * s for p, s in zip(prow, srow)] for prow, srow in zip(w, step)], moments


@pytest.mark.parametrize("polynomial", ["quintic", "polar-express"])
def test_normuon_step_matches_a_hand_computation(polynomial):
    mu, lr, wd, beta2 = 0.9, 0.1, 0.2, 0.95
    w0 = [[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]]
    g1 = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]   # rows of different sizes: the update's rows differ too
    g2 = [[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
    # Nesterov momentum: buf = mu buf + g, direction = g + mu buf
    d1 = [[(1 + mu) * v for v in row] for row in g1]
    d2 = [[b + mu * (mu * a + b) for a, b in zip(ra, rb)] for ra, rb in zip(g1, g2)]
    w1, moments = hand_step(w0, d1, [0.0, 0.0], polynomial, lr, wd, beta2)
    w2, moments = hand_step(w1, d2, moments, polynomial, lr, wd, beta2)

    w = torch.tensor(w0, dtype=F64, requires_grad=True)
    opt = Muon([w], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=F64, polynomial=polynomial,
               normalize="neuron", beta2=beta2)
    for g, expected in ((g1, w1), (g2, w2)):
        w.grad = torch.tensor(g, dtype=F64)
        opt.step()
        # to float32's precision: the second moments are kept in float32 whatever the weights' type
        torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=F64), atol=1e-7, rtol=0)
    state = opt.state[w]["neuron_second_moment"]
    assert state.dtype == torch.float32 and state.shape == (2, 1)
    torch.testing.assert_close(state.flatten(), torch.tensor(moments, dtype=torch.float32))
    # without the normalisation the rows keep their unequal sizes: the option changes the step
    plain = torch.tensor(w0, dtype=F64, requires_grad=True)
    plain.grad = torch.tensor(g1, dtype=F64)
    Muon([plain], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=F64, polynomial=polynomial).step()
    assert not torch.allclose(plain.detach(), torch.tensor(w1, dtype=F64), atol=1e-6)


# c. weight decay and learning rate per kind of parameter

class WithValueEmbeds(Transformer):
    """The model with what the speedrun adds: value-embedding tables and a learned mixing scalar (0-D),
    and a frozen parameter, which no group may take."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model) for _ in range(2))
        self.mix = nn.Parameter(torch.tensor(0.5))
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def kind_by_name(name: str, p: torch.Tensor, tied: bool) -> str:
    if p.dim() < 2:
        return "scalar"
    if name in ("tok_emb.weight", "pos_emb.weight") or name.startswith("value_embeds."):
        return "embedding"
    if name == "lm_head.weight":
        return "embedding" if tied else "head"
    return "matrix"


SCALES = dict(lr=0.01, muon_lr_scale=10.0, embed_lr_scale=2.0, head_lr_scale=3.0, scalar_lr_scale=0.5,
              weight_decay=0.05)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_is_in_one_group_with_its_kinds_lr_and_decay(optimizer, tied):
    cfg = build_config({"model": {"vocab_size": 50, "context": 16, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                  "position": "learned", "bias": True, "tie_embeddings": tied}}).model
    model = WithValueEmbeds(cfg)
    tc = TrainConfig(optimizer=optimizer, muon_weight_decay=0.3, **SCALES)
    opt = build_optimizer(model, tc, torch.device("cpu"))
    set_lr(opt, 1.0)
    where = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in where, "a parameter in two groups"
            where[id(p)] = group
    named = dict(model.named_parameters())   # a tied head comes once, as tok_emb.weight
    assert ("lm_head.weight" in named) != tied
    assert set(where) == {id(p) for p in named.values() if p.requires_grad}
    muon_group = opt.parts[0].param_groups[0] if optimizer == "muon" else None
    expected = {"embedding": (2.0, 0.05), "head": (3.0, 0.05), "scalar": (0.5, 0.0),
                "matrix": (10.0, 0.3) if optimizer == "muon" else (1.0, 0.05)}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        kind = kind_by_name(name, p, tied)
        group = where[id(p)]
        assert (group["lr"], group["weight_decay"]) == expected[kind], name
        assert (group is muon_group) == (kind == "matrix" and optimizer == "muon"), name


@pytest.mark.parametrize("normalize", ["none", "neuron"])
def test_weight_decay_is_decoupled_at_each_groups_own_lr(normalize):
    """With zero gradients the updates are zero (Muon's orthogonalised zero, AdamW's 0 / (0 + eps)), so
    one step leaves each parameter times 1 - lr * weight_decay of its group, and the scalars as they were."""
    torch.manual_seed(0)
    model = WithValueEmbeds(build_config({"model": {"vocab_size": 50, "context": 16, "d_model": 32,
                                                    "n_layers": 1, "n_heads": 2, "tie_embeddings": False,
                                                    "bias": True}}).model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    for muon_wd, matrix_wd in ((0.3, 0.3), (-1.0, 0.05)):   # -1: as train.weight_decay
        tc = TrainConfig(optimizer="muon", muon_weight_decay=muon_wd, muon_normalize=normalize, **SCALES)
        opt = build_optimizer(model, tc, torch.device("cpu"))
        set_lr(opt, 0.01)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt.step()
        factor = {"matrix": 1 - 0.01 * 10 * matrix_wd, "embedding": 1 - 0.01 * 2 * 0.05,
                  "head": 1 - 0.01 * 3 * 0.05, "scalar": 1.0}
        for name, p in model.named_parameters():
            if p.requires_grad:
                want = before[name] * factor[kind_by_name(name, p, tied=False)]
                torch.testing.assert_close(p.detach(), want, atol=1e-7, rtol=1e-6, msg=name)


# d. resume

def test_a_normuon_run_resumes_to_the_losses_of_an_uninterrupted_one(play_text, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    settings = [f"data.dataset={play_text}", *tiny_run("train.eval_every=0", "train.threads=1"),
                "train.optimizer=muon", "train.muon_normalize=neuron", "train.muon_polynomial=polar-express",
                "train.muon_weight_decay=0.02", "train.embed_lr_scale=2", "train.head_lr_scale=0.5",
                "train.scalar_lr_scale=3", "model.tie_embeddings=false", "train.max_steps=6",
                "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    with one_thread():
        pretrain(load_config(recipe_path("shakespeare-cpu.toml"), settings), straight, progress=False)
        # the same run, as if it had died after step 3 was checkpointed
        shutil.copytree(straight, run)
        shutil.rmtree(rundir.list_checkpoints(run)[-1])
        pretrain(load_config(recipe_path("shakespeare-cpu.toml"), [*settings, "train.resume=auto"]), run,
                 progress=False)
    slots = load_file(str(rundir.list_checkpoints(run)[0] / "optimizer.safetensors"))
    assert any(key.endswith("/neuron_second_moment") for key in slots)

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert set(losses(run)) == set(range(1, 7)) and losses(run) == losses(straight)


def test_normuon_state_comes_back_from_a_checkpoint(tmp_path):
    from scratchlm.loading import load_weights
    from scratchlm.train import checkpoint as ckpt
    from scratchlm.train import distributed as dist

    tc = TrainConfig(optimizer="muon", lr=1e-2, muon_normalize="neuron", muon_polynomial="polar-express")
    model = tiny_model(64)
    opt = build_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(m, o):
        m(x, targets=x).backward()
        o.step()
        o.zero_grad(set_to_none=True)

    for _ in range(3):
        step(model, opt)
    saved = ckpt.save_checkpoint(tmp_path, 3, model, dist.full_optimizer_state(model, opt), {"loader": {}})
    resumed_model = tiny_model(64)
    load_weights(resumed_model, saved)
    resumed = build_optimizer(resumed_model, tc, torch.device("cpu"))
    dist.load_optimizer_state(resumed_model, resumed, ckpt.read_optimizer_state(saved, ckpt.load_training_state(saved)))
    moments = [s["neuron_second_moment"] for s in opt.parts[0].state.values()]
    back = [s["neuron_second_moment"] for s in resumed.parts[0].state.values()]
    assert len(moments) == len(back) == len(opt.parts[0].param_groups[0]["params"])
    assert all(m.abs().sum() > 0 and torch.equal(m, b) for m, b in zip(moments, back))
    for _ in range(2):
        step(model, opt)
        step(resumed_model, resumed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


# e. the config refuses what the code would not take, in one line

@pytest.mark.parametrize("setting, message", [
    ("train.muon_polynomial=polar_express", r"train.muon_polynomial = 'polar_express' is not one of quintic, "
                                            r"polar-express \(did you mean polar-express\?\)"),
    ("train.muon_normalize=row", r"train.muon_normalize = 'row' is not one of none, neuron"),
    ("train.muon_weight_decay=-0.5", r"train.muon_weight_decay = -0.5 is out of range: it must be >= 0, or -1"),
    ("train.muon_weight_decay=nan", r"train.muon_weight_decay = nan is out of range"),
    ("train.embed_lr_scale=0", r"train.embed_lr_scale = 0.0 is out of range: it must be > 0"),
    ("train.head_lr_scale=-1", r"train.head_lr_scale = -1.0 is out of range"),
    ("train.scalar_lr_scale=inf", r"train.scalar_lr_scale = inf is out of range"),
    ("sft.train.muon_weight_decay=-2", r"sft.train.muon_weight_decay = -2.0 is out of range"),
])
def test_bad_optimizer_settings_are_one_line(setting, message):
    with pytest.raises(UserError, match=message) as e:
        build_config({}, [setting])
    assert "\n" not in str(e.value)


def test_muon_weight_decay_defaults_to_weight_decay():
    assert TrainConfig(weight_decay=0.07).muon_decay == 0.07
    assert TrainConfig(weight_decay=0.07, muon_weight_decay=0.0).muon_decay == 0.0
    assert build_config({}, ["train.muon_weight_decay=-1"]).train.muon_decay == 0.1
