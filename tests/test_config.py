import pytest

from scratchlm.config import build_config, load_config, parse_override, recipe_path
from scratchlm.errors import UserError


def test_preset_then_overrides(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layers = 6\n[train]\nlr = 1\n')
    cfg = load_config(path, ["model.d_model=128", "train.schedule=wsd", 'data.special_tokens=["<eos>"]'])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.context) == (6, 128, 256)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.schedule == "wsd" and cfg.data.special_tokens == ["<eos>"]


def test_unknown_key_names_the_nearest():
    with pytest.raises(UserError, match=r"unknown key train\.lrr \(did you mean lr\?\)"):
        build_config({}, ["train.lrr=3"])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(UserError, match="train.max_steps must be int"):
        build_config({}, ["train.max_steps=abc"])
    with pytest.raises(UserError, match="model.position = 'rotary' is not one of"):
        build_config({}, ["model.position=rotary"])
    with pytest.raises(UserError, match="unknown model.preset 'tinny' \\(did you mean tiny\\?\\)"):
        build_config({"model": {"preset": "tinny"}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 3")
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_override_syntax():
    assert parse_override("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_override("data.dataset=hf:roneneldan/TinyStories") == ("data", "dataset", "hf:roneneldan/TinyStories")
    with pytest.raises(UserError, match="expected section.key=value"):
        parse_override("lr=3")


def test_shipped_recipes_load():
    names = sorted(p.name for p in recipe_path("shakespeare-cpu.toml").parent.glob("*.toml"))
    assert {"shakespeare-cpu.toml", "shakespeare-gpu-frontier.toml", "gpt2-124m-frontier.toml"} <= set(names)
    for name in names:
        load_config(recipe_path(name))
