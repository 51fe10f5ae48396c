"""Attention maps: the weights read from the model equal a softmax computed here from its own projections,
the model is left as it was, and `scratchlm attention` writes a non-empty grid of heat maps."""
from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import load_config, recipe_path
from scratchlm.model.transformer import Transformer
from scratchlm.viz.attention import attention_maps, plot_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(position: str, **extra) -> Transformer:
    overrides = ["model.vocab_size=50", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=24",
                 f"model.position={position}", *(f"model.{k}={v}" for k, v in extra.items())]
    torch.manual_seed(0)
    return Transformer(load_config(None, overrides).model).eval()


def test_maps_are_the_softmax_of_the_models_own_scores():
    # NoPE and grouped keys (2 key heads for 4 query heads): the first layer's weights by hand.
    model = tiny("nope", n_kv_heads=2)
    ids = [3, 14, 15, 9, 26, 5, 35]
    maps = attention_maps(model, ids)
    assert len(maps) == 2 and maps[0].shape == (4, 7, 7)
    with torch.no_grad():
        attn = model.blocks[0].attn
        x = model.blocks[0].attn_norm(model.tok_emb(torch.tensor([ids])))[0]
        q = attn.q_proj(x).view(7, 4, 8).transpose(0, 1)
        k = attn.k_proj(x).view(7, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(8)
        scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
        torch.testing.assert_close(maps[0], scores.softmax(-1), rtol=1e-5, atol=1e-6)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(4, 7))
        assert (m.triu(1) == 0).all()           # nothing from the future


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_reading_the_maps_leaves_the_model_as_it_was(position):
    model = tiny(position)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids)
    maps = attention_maps(model, ids[0].tolist())
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(before, after)
    assert all(not b.attn.keep_weights and b.attn.last_weights is None for b in model.blocks)
    assert all(torch.isfinite(m).all() for m in maps)


def test_plot_grid_is_written(tmp_path):
    model = tiny("rope")
    maps = attention_maps(model, list(range(10)))
    path = plot_attention(maps, [f"t{i}" for i in range(10)], tmp_path / "att.png", title="x")
    image = matplotlib.image.imread(path)
    assert path.stat().st_size > 10_000 and image.shape[0] > 400 and image.shape[1] > 800
    assert np.asarray(image).std() > 0.05       # not a blank page
    one = plot_attention(maps, [f"t{i}" for i in range(10)], tmp_path / "one.png", layers=[1])
    assert matplotlib.image.imread(one).shape[0] < image.shape[0]   # one row of heads instead of two


@pytest.mark.slow
def test_attention_command(play_text, tmp_path, monkeypatch, capsys):
    from scratchlm.train.pretrain import pretrain

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    pretrain(load_config(recipe_path("shakespeare-cpu.toml"), [
        f"data.dataset={play_text}", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.context=16",
        "data.vocab_size=280", "train.micro_batch=2", "train.eval_every=0", "train.max_steps=1", "train.minutes=0",
        "train.warmup_steps=1"]), run, progress=False)
    capsys.readouterr()
    out = tmp_path / "att.png"
    assert main(["attention", "--checkpoint", str(run), "--prompt", "ROMEO.\nLove night day", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    assert out.stat().st_size > 10_000 and np.asarray(matplotlib.image.imread(out)).std() > 0.05
    assert main(["attention", "--checkpoint", str(run), "--prompt", "x", "--layer", "2"]) == 2
    assert "--layer 2: this model has layers 0 to 1" in capsys.readouterr().err
