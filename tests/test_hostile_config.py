"""Hostile settings and files: every config value is checked when the config is built (one line naming the
field, the value and what is allowed), damaged shard folders and config files fail by name, a model trained
with the Triton kernel still loads and runs where the kernel cannot, and the window and norm details are
held to independent references."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing

import numpy as np
import pytest
import torch
from cli_checks import one_line_error

from scratchlm.cli import main
from scratchlm.config import (DataConfig, ModelConfig, RunConfig, SFTConfig, TrainConfig, build_config, load_config,
                              recipe_path)
from scratchlm.data.loader import RandomWindows, SlidingWindowDataset
from scratchlm.errors import UserError

RECIPE = str(recipe_path("shakespeare-cpu.toml"))
FLOAT_FIELDS = {f"{section}.{f.name}" for section, cls in (("train", TrainConfig), ("model", ModelConfig),
                                                          ("sft", SFTConfig), ("sft.train", TrainConfig))
                for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is float}


pytestmark = pytest.mark.usefixtures("offline_cache")




def refused(*overrides: str) -> str:
    with pytest.raises(UserError) as e:
        build_config({}, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- choices
@pytest.mark.parametrize("override, field, bad, nearest", [
    ("train.schedule=cosin", "train.schedule", "cosin", "cosine"),
    ("train.optimizer=adamm", "train.optimizer", "adamm", "adamw"),
    ("train.precision=bf61", "train.precision", "bf61", "bf16"),
    ("train.parallel=fdsp", "train.parallel", "fdsp", "fsdp"),
    ("train.implementation=refrence", "train.implementation", "refrence", "reference"),
    ("train.resume=auot", "train.resume", "auot", "auto"),
    ('train.log_to=["tensorboard", "wandbb"]', "train.log_to", "wandbb", "wandb"),
    ("train.device=cdua", "train.device", "cdua", "cuda"),
    ("model.position=rop", "model.position", "rop", "rope"),
    ("model.norm=rmsnrom", "model.norm", "rmsnrom", "rmsnorm"),
    ("model.mlp=swiglo", "model.mlp", "swiglo", "swiglu"),
    ("model.attention=sdap", "model.attention", "sdap", "sdpa"),
    ("sft.train.schedule=linaer", "sft.train.schedule", "linaer", "linear"),
])
def test_a_misspelt_choice_fails_when_the_config_is_built(override, field, bad, nearest):
    message = refused(override)
    assert f"{field} = {bad!r} is not one of" in message and f"did you mean {nearest}?" in message


def test_every_device_the_picker_takes_is_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"):
        assert build_config({}, [f"train.device={device}"]).train.device == device
    for device in ("potato", "cuda:", "cuda:x", "gpu0", ""):
        assert "train.device" in refused(f'train.device="{device}"')


# ----------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("override, allowed", [
    ("train.lr=-1", "> 0"), ("train.lr=0", "> 0"), ("train.lr=nan", "> 0"),
    ("train.micro_batch=0", ">= 1"), ("train.max_steps=-5", ">= 0"), ("train.minutes=-1", ">= 0"),
    ("train.minutes=inf", ">= 0"), ("train.threads=-1", ">= 0"), ("train.batch_tokens=-1", ">= 0"),
    ("train.warmup_steps=-1", ">= 0"), ("train.cooldown_steps=-1", ">= 0"), ("train.weight_decay=-0.1", ">= 0"),
    ("train.beta1=1", "in [0, 1)"), ("train.beta2=-0.5", "in [0, 1)"), ("train.muon_momentum=1.5", "in [0, 1)"),
    ("train.muon_lr_scale=0", "> 0"), ("train.min_lr_ratio=1.5", "in [0, 1]"), ("train.grad_clip=-1", ">= 0"),
    ("train.eval_every=-1", ">= 0"), ("train.eval_tokens=-1", ">= 0"), ("train.checkpoint_every=-2", ">= 0"),
    ("train.keep_checkpoints=-1", ">= 0"), ("train.log_every=0", ">= 1"), ("train.seed=-1", ">= 0"),
    ("model.context=0", ">= 1"), ("model.n_layers=0", ">= 1"), ("model.dropout=2", "in [0, 1)"),
    ("model.d_model=-128", ">= 1"), ("model.n_heads=0", ">= 1"), ("model.n_kv_heads=-2", ">= 0"),
    ("model.d_ff=-1", ">= 0"), ("model.norm_eps=0", "> 0"), ("model.norm_eps=-1e-5", "> 0"),
    ("model.vocab_size=0", ">= 1"), ("model.rope_base=0", "> 1"), ("model.init_std=0", "> 0"),
    ("sft.val_fraction=1", "in [0, 1)"), ("sft.epochs=-1", ">= 0"), ("sft.persona_weight=-1", ">= 0"),
    ("sft.eval_examples=-1", ">= 0"), ("sft.eval_max_new_tokens=0", ">= 1"),
    ("sft.train.micro_batch=0", ">= 1"), ("sft.train.lr=-3e-4", "> 0"),
])
def test_a_value_out_of_range_names_field_value_and_range(override, allowed):
    field, raw = override.split("=")
    value = tomllib.loads(f"v = {raw}")["v"]
    value = float(value) if isinstance(value, int) and "." not in raw and field in FLOAT_FIELDS else value
    message = refused(override)
    assert f"{field} = {value!r} is out of range: it must be " in message and message.endswith(allowed), message


def test_relations_between_model_fields():
    assert "model.d_model (256) must be divisible by model.n_heads (3)" in refused("model.n_heads=3")
    assert "model.n_heads (4) must be divisible by model.n_kv_heads (3)" in refused("model.n_kv_heads=3")
    # -2 divides 4 in Python's arithmetic, so only the range check stops it
    assert "model.n_kv_heads = -2" in refused("model.n_kv_heads=-2")
    assert "data.vocab_size = 100" in refused("data.vocab_size=100") and "256 byte tokens + 4" in refused(
        "data.vocab_size=100")
    assert "repeated special token" in refused('data.special_tokens=["<eos>", "<eos>"]')


def test_values_at_the_edges_are_accepted():
    cfg = build_config({}, ["train.grad_clip=0", "train.keep_checkpoints=0", "train.eval_every=0", "train.lr=1e30",
                            "train.eval_tokens=0", "train.min_lr_ratio=1", "train.beta1=0", "model.dropout=0.5",
                            "model.n_kv_heads=1", "train.warmup_steps=0", "data.vocab_size=260", "sft.epochs=0"])
    assert cfg.train.lr == 1e30 and cfg.model.kv_heads == 1


def _numeric_and_text_fields(cls):
    hints = typing.get_type_hints(cls)
    numeric = {f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)}
    text = {f.name for f in dataclasses.fields(cls) if hints[f.name] is str}
    return numeric, text


@pytest.mark.parametrize("cls, free_text", [
    (ModelConfig, {"preset"}), (TrainConfig, {"device"}), (SFTConfig, {"init", "persona", "persona_name",
                                                                       "persona_about", "persona_creator"}),
])
def test_every_numeric_and_choice_field_has_a_rule(cls, free_text):
    """A field added later without a range or a list of choices fails here, not in someone's run."""
    numeric, text = _numeric_and_text_fields(cls)
    assert numeric <= set(cls.RANGES), numeric - set(cls.RANGES)
    assert text - free_text <= set(cls.CHOICES), text - free_text - set(cls.CHOICES)
    section = {ModelConfig: "model", TrainConfig: "train", SFTConfig: "sft"}[cls]
    for name in numeric:
        rule = cls.RANGES[name]
        outside = rule.low if rule.low_open else rule.low - 1
        message = refused(f"{section}.{name}={outside}")
        assert f"{section}.{name} = " in message


def test_config_is_checked_before_any_work_via_the_cli(capsys, tmp_path):
    # the recipe's dataset would be downloaded (and the cache is empty): the error must come first
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--set", "train.schedule=cosin",
                                  "--out", str(tmp_path / "run")])
    assert "train.schedule = 'cosin'" in err and "did you mean cosine?" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--set", "model.dropout=2"])
    assert "model.dropout = 2.0" in err and "[0, 1)" in err and "shakespeare-cpu.toml" in err
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nmicro_batch = 0\n')
    err = one_line_error(capsys, ["pretrain", "--config", str(recipe)])
    assert "r.toml" in err and "train.micro_batch = 0" in err and ">= 1" in err
    recipe.write_text('[sft]\ninit = "x"\n[sft.train]\nlog_every = 0\n')
    err = one_line_error(capsys, ["sft", "--config", str(recipe)])
    assert "sft.train.log_every = 0" in err


# ----------------------------------------------------------------------------- config files
def test_a_config_that_is_not_utf8_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[train]\nlr = 3e-3\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.toml: invalid TOML: not UTF-8 text \(byte 0xe9 on line 3\)"):
        load_config(bad)
    err = one_line_error(capsys, ["pretrain", "--config", str(bad)])
    assert "latin1.toml" in err and "line 3" in err


def test_invalid_toml_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nd_model = 64\nn_heads = = 4\n')
    err = one_line_error(capsys, ["pretrain", "--config", str(bad)])
    assert "bad.toml" in err and "invalid TOML" in err and "line 3" in err


# ----------------------------------------------------------------------------- the Triton kernel on a CPU
TRITON_SMALL = dict(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2, attention="triton")


def test_triton_config_is_coherence_only():
    ModelConfig(**TRITON_SMALL).validate()  # a CPU machine may hold a run trained on a GPU
    with pytest.raises(UserError, match="head sizes"):
        ModelConfig(**{**TRITON_SMALL, "d_model": 48}).validate()
    with pytest.raises(UserError, match="dropout"):
        ModelConfig(**{**TRITON_SMALL, "dropout": 0.1}).validate()


def _triton_run(tmp_path) -> tuple[RunConfig, object]:
    """A run folder as a GPU training with model.attention = "triton" would leave it."""
    from scratchlm.model.transformer import Transformer
    from scratchlm.tokenizer import Tokenizer, train_bpe
    from scratchlm.train.checkpoint import save_checkpoint

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log\n" * 20)
    vocab, merges = train_bpe(str(text), 280, ["<eos>"], progress=False)
    run = tmp_path / "run"
    Tokenizer(vocab, merges, ["<eos>"]).save(run / "tokenizer")
    cfg = build_config({"model": {**TRITON_SMALL, "vocab_size": 280}})
    torch.manual_seed(0)
    save_checkpoint(run, 1, Transformer(cfg.model), None, {"step": 1})
    cfg.save(run / "config.toml")
    return cfg, run


def test_a_triton_run_loads_and_runs_on_sdpa_with_one_notice(tmp_path, capsys, monkeypatch):
    from scratchlm import loading
    from scratchlm.model import flash_triton
    from scratchlm.model.transformer import Transformer

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernel would run")
    monkeypatch.setattr(flash_triton, "_noticed", False)
    cfg, run = _triton_run(tmp_path)
    capsys.readouterr()
    loaded = loading.load(run)
    plain = Transformer(dataclasses.replace(cfg.model, attention="sdpa")).eval()
    plain.load_state_dict(loaded.model.state_dict())
    ids = torch.randint(0, 280, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), plain(ids), rtol=0, atol=0)
        loaded.model(ids)
    err = capsys.readouterr().err
    assert err.count("note: model.attention = 'triton'") == 1 and "SDPA" in err and err.count("\n") == 1

    assert main(["generate", "--checkpoint", str(run), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat") and "Traceback" not in captured.err
    # and it leaves for the ecosystem: Hugging Face's Llama reads the same weights to the same logits
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, plain(ids), rtol=1e-4, atol=1e-4)


def test_training_with_triton_where_it_cannot_run_is_one_line(monkeypatch):
    from scratchlm.model import flash_triton
    from scratchlm.train.loop import fit

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernel would run")
    cfg = build_config({"model": TRITON_SMALL}, ["train.device=cpu", "train.max_steps=1"])
    with pytest.raises(UserError) as e:
        fit(cfg, "never-written", job=None)  # the check comes before anything touches the job or the folder
    assert "\n" not in str(e.value) and "CUDA" in str(e.value) and "model.attention = sdpa" in str(e.value)
    monkeypatch.setattr(flash_triton, "triton", None)
    with pytest.raises(UserError, match="needs the triton package"):
        flash_triton.require_usable(cfg.model, "cuda")
    flash_triton.require_usable(build_config({}).model, "cpu")  # sdpa: nothing to require


def test_pretraining_with_triton_where_it_cannot_run_stops_before_preparing_data(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernel would run")
    missing = tmp_path / "no-such-corpus.txt"  # were the data prepared first, this would be the error
    from scratchlm.config import recipe_path

    recipe = str(recipe_path("shakespeare-cpu.toml"))
    err = one_line_error(capsys, ["pretrain", "--config", recipe, "--out", str(tmp_path / "run"),
                                  "--set", "model.attention=triton", "--set", f"data.dataset={missing}"])
    assert "model.attention = 'triton'" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- query/key norm
def test_qk_norm_follows_norm_eps_like_qwen3():
    """Qwen3 and OLMo-2 normalise queries and keys with the model's rms_norm_eps; so must we."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    from scratchlm.model.transformer import Transformer

    eps = 1e-2  # large, so that it dominates the mean square of these small inputs
    model = Transformer(ModelConfig(vocab_size=32, context=8, d_model=32, n_layers=1, n_heads=2, qk_norm=True,
                                    norm_eps=eps))
    attn = model.blocks[0].attn
    x = 0.05 * torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    for ours in (attn.q_norm, attn.k_norm):
        with torch.no_grad():
            ours.weight.copy_(torch.linspace(0.5, 1.5, 16))
        reference = qwen3.Qwen3RMSNorm(16, eps=eps)
        reference.weight.data.copy_(ours.weight.data)
        torch.testing.assert_close(ours(x), reference(x))
        by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ours.weight
        torch.testing.assert_close(ours(x), by_hand)


# ----------------------------------------------------------------------------- training windows
def test_random_windows_reach_every_target_as_sliding_windows_do():
    context, shard = 4, np.arange(10, dtype=np.uint16)
    loader = RandomWindows([shard], context, batch=64, seed=0)
    seen = {tuple(x.tolist()) for _ in range(10) for x in loader.next_batch()[0]}
    sliding = {tuple(x.tolist()) for x, _ in SlidingWindowDataset(shard, context, stride=1)}
    assert seen == sliding and len(sliding) == 10 - context
    targets = {t for _ in range(10) for y in loader.next_batch()[1] for t in y.tolist()}
    assert targets == set(range(1, 10))  # every token but the first, the last one included


def test_a_shard_of_exactly_context_plus_one_tokens_is_one_window():
    context = 8
    loader = RandomWindows([np.arange(context + 1, dtype=np.uint16), np.arange(3, dtype=np.uint16)], context, 3, 0)
    x, y = loader.next_batch()
    assert x.tolist() == [list(range(context))] * 3 and y.tolist() == [list(range(1, context + 1))] * 3
    with pytest.raises(UserError, match=r"context \+ 1 = 9 tokens \(the longest has 8\)"):
        RandomWindows([np.arange(context, dtype=np.uint16)], context, 3, 0)


# ----------------------------------------------------------------------------- damaged shard folders
@pytest.fixture()
def shard_run(tmp_path):
    """A tokenizer and a shard folder encoded with it, small enough to make per test."""
    from scratchlm.data.shards import encode_corpus
    from scratchlm.tokenizer import Tokenizer, train_bpe

    text = tmp_path / "train.txt"
    text.write_text("to be or not to be that is the question\n" * 40)
    val = tmp_path / "val.txt"
    val.write_text("whether tis nobler in the mind to suffer\n" * 10)
    vocab, merges = train_bpe(str(text), 300, ["<eos>"], progress=False)
    tok = Tokenizer(vocab, merges, ["<eos>"])
    tok.save(tmp_path / "tok")
    encode_corpus(tok, tmp_path / "tok", {"train": [text], "val": [val]}, tmp_path / "shards", progress=False,
                  workers=1)
    return tmp_path / "tok", tmp_path / "shards"


def test_a_shard_cut_mid_token_is_named(shard_run):
    from scratchlm.data.shards import open_split

    _, shards = shard_run
    assert open_split(shards, "train")  # intact
    path = shards / "train_0000.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError) as e:
        open_split(shards, "train")
    message = str(e.value)
    assert "train_0000.bin" in message and "not a whole number of 2-byte tokens" in message
    assert f"delete {shards}" in message and "\n" not in message


def test_a_shard_shorter_than_meta_says_is_named(shard_run):
    from scratchlm.data.shards import open_split

    _, shards = shard_run
    path = shards / "val_0000.bin"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 // 2 * 2])  # whole tokens, but half of them
    with pytest.raises(UserError, match=r"val_0000\.bin holds \d+ tokens but meta\.json says"):
        open_split(shards, "val")
    path.unlink()
    with pytest.raises(UserError, match=r"val_0000\.bin is missing"):
        open_split(shards, "val")


@pytest.mark.parametrize("content", [
    b"", b"{\"vocab_size\": 300, \"dty", b"\xff\xfe garbage", b"[1, 2, 3]", b'{"dtype": "uint16", "splits": {}}',
    b'{"dtype": "float64", "tokenizer": "x", "splits": {}}',
    b'{"dtype": "uint16", "tokenizer": "x", "splits": {"train": {"files": ["../../etc/passwd"], "tokens": 1}}}',
])
def test_a_garbage_meta_json_is_named(shard_run, content):
    from scratchlm.data.shards import open_split, read_meta

    _, shards = shard_run
    (shards / "meta.json").write_bytes(content)
    for call in (lambda: read_meta(shards), lambda: open_split(shards, "train")):
        with pytest.raises(UserError) as e:
            call()
        assert "meta.json" in str(e.value) and "encode again" in str(e.value) and "\n" not in str(e.value)


def test_damaged_shards_via_the_cli_are_one_line(shard_run, capsys, tmp_path):
    tok, shards = shard_run
    path = shards / "train_0000.bin"
    path.write_bytes(path.read_bytes()[:-3])
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "run"),
                                  "--set", f"data.shards={shards}", "--set", f"data.tokenizer={tok}",
                                  "--set", "model.context=16", "--set", "train.max_steps=1"])
    assert "train_0000.bin" in err
    (shards / "meta.json").write_text("{not json")
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "run"),
                                  "--set", f"data.shards={shards}", "--set", f"data.tokenizer={tok}"])
    assert "meta.json" in err and "not valid JSON" in err


# ----------------------------------------------------------------------------- tokenizer vocabulary size
@pytest.mark.parametrize("size", ["10", "-5", "0", "259"])
def test_a_vocab_below_the_bytes_and_specials_is_one_line(capsys, tmp_path, size):
    text = tmp_path / "t.txt"
    text.write_text("some text to learn from\n")
    err = one_line_error(capsys, ["tokenizer", "train", "--input", str(text), "--vocab-size", size,
                                  "--out", str(tmp_path / "tok")])
    assert f"vocab size {size} is below the minimum of 260 (256 byte tokens + 4 special tokens)" in err
    assert not (tmp_path / "tok").exists()


def test_a_vocab_the_text_cannot_fill_warns_with_what_was_learned(capsys, tmp_path):
    from scratchlm.tokenizer import Tokenizer

    text = tmp_path / "t.txt"
    text.write_text("abab abab cdcd\n")
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "1000000000",
                 "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    learned = Tokenizer.load(tmp_path / "tok").vocab_size
    assert learned < 300
    assert f"warning: asked for 1,000,000,000 tokens but no pair of tokens is left to merge: the vocabulary " \
           f"has {learned:,}" in err


def test_an_empty_input_warns_that_only_bytes_were_learned(capsys, tmp_path):
    from scratchlm.tokenizer import Tokenizer

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["tokenizer", "train", "--input", str(empty), "--vocab-size", "500", "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 260
    assert "warning: asked for 500 tokens but the input holds no text: the vocabulary has 260" in err


def test_a_numeric_override_keeps_its_type_after_checks():
    cfg = build_config({}, ["train.lr=1", "model.norm_eps=1"])
    assert isinstance(cfg.train.lr, float) and math.isclose(cfg.model.norm_eps, 1.0)
    assert DataConfig().vocab_size == 4096 and json.dumps(cfg.to_dict())
