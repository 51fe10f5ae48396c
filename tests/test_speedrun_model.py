"""The speedrun literature's model options (ReLU^2 MLP, logit soft-cap, zero-initialised projections, value
embeddings, U-net skips), each against a hand computation or torch.nn.functional, on every path: training
loss, cached decoding, checkpoints, parameter counts and the export refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run

from scratchlm.cli import main
from scratchlm.config import build_config, load_config, recipe_path
from scratchlm.convert.bundle import Bundle
from scratchlm.convert.families import hf_family, to_hf_config
from scratchlm.errors import UserError
from scratchlm.loading import load, model_shapes
from scratchlm.model.info import count_params
from scratchlm.model.layers import MLP
from scratchlm.model.loss import IGNORE_INDEX, linear_cross_entropy, softcap
from scratchlm.model.transformer import Transformer, value_table

OPTIONS = {"relu2": {"mlp": "relu2"}, "softcap": {"logit_softcap": 2.0}, "zero_init": {"zero_init_proj": True},
           "value_embeds": {"value_embeds": 2}, "unet": {"unet_skips": True}}
ALL = {k: v for option in OPTIONS.values() for k, v in option.items()}


def config(**model):
    return build_config({"model": {"vocab_size": 61, "context": 32, "d_model": 32, "n_layers": 5, "n_heads": 4,
                                   "n_kv_heads": 2, "init_std": 0.1, **model}}).model


def model_of(**model) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(config(**model)).eval()
    with torch.no_grad():  # learned scalars away from their starting values, so that a misplaced one shows
        for name, p in m.named_parameters():
            if name.endswith(("value_mix", "skip_weights")):
                p.uniform_(-1.5, 1.5)
    return m


# ----------------------------------------------------------------------------- ReLU^2


def test_relu2_mlp_is_relu_squared():
    mlp = MLP(8, 32, "relu2")
    x = torch.randn(5, 8)
    torch.testing.assert_close(mlp(x), (F.relu(x @ mlp.up.weight.T) ** 2) @ mlp.down.weight.T)
    cfg = config(mlp="relu2")
    assert cfg.ffn_hidden == 4 * cfg.d_model
    assert Transformer(cfg).blocks[0].mlp.up.weight.shape == (4 * 32, 32)


# ----------------------------------------------------------------------------- logit soft-cap


def test_softcap_by_hand():
    capped = softcap(torch.tensor([0.0, 30.0, 300.0, -300.0]), 30.0)
    expected = torch.tensor([0.0, 30 * math.tanh(1.0), 30 * math.tanh(10.0), -30 * math.tanh(10.0)])
    torch.testing.assert_close(capped, expected)
    assert 29.99 < capped[2] <= 30.0


def test_model_logits_are_capped_on_every_output():
    plain, capped = model_of(), model_of(logit_softcap=0.5)
    x = torch.randint(0, 61, (2, 9))
    raw = plain(x)
    assert raw.abs().max() > 1.0  # the cap has something to do
    torch.testing.assert_close(capped(x), 0.5 * torch.tanh(raw / 0.5))
    torch.testing.assert_close(capped(x, last_only=True), 0.5 * torch.tanh(raw[:, -1:] / 0.5))
    y = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(capped(x, targets=y), F.cross_entropy(0.5 * torch.tanh(raw / 0.5).flatten(0, 1), y.flatten()))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_loss_with_softcap_matches_cross_entropy_of_capped_logits(dtype, tol):
    torch.manual_seed(1)
    hidden = (torch.randn(11, 16, dtype=dtype) * 3).requires_grad_()
    weight = torch.randn(37, 16, dtype=dtype).requires_grad_()
    targets = torch.randint(0, 37, (11,))
    targets[[2, 7]] = IGNORE_INDEX
    cap = 4.0

    def grads(loss_fn):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = loss_fn(h, w)
        (loss * 2.5).backward()
        return loss.detach(), h.grad, w.grad

    ours = grads(lambda h, w: linear_cross_entropy(h, w, targets, rows=3, cap=cap))
    theirs = grads(lambda h, w: F.cross_entropy(cap * torch.tanh((h @ w.T) / cap), targets))
    assert (hidden @ weight.T).abs().max() > 3 * cap  # deep in the saturated part of tanh
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    with torch.no_grad():  # the path without gradients caps too
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, rows=4, cap=cap), theirs[0],
                                   rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- zero-initialised projections


def test_zero_init_projections_make_the_first_forward_the_embedding_path():
    m = model_of(zero_init_proj=True)
    for block in m.blocks:
        assert not block.attn.o_proj.weight.any() and not block.mlp.down.weight.any()
        assert block.attn.q_proj.weight.std() > 0.05 and block.mlp.up.weight.std() > 0.05
    x = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(m(x), m.lm_head(m.final_norm(m.tok_emb(x))))
    # and they learn: their gradients are not zero
    m.train()
    m(x, targets=torch.randint(0, 61, (2, 7))).backward()
    assert m.blocks[0].attn.o_proj.weight.grad.abs().sum() > 0 and m.blocks[0].mlp.down.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- value embeddings


def test_value_tables_feed_a_layer_and_its_mirror():
    assert [value_table(config(value_embeds=2), i) for i in range(5)] == [0, 1, None, 1, 0]
    assert [value_table(config(value_embeds=1, n_layers=4), i) for i in range(4)] == [0, None, None, 0]
    m = model_of(value_embeds=2)
    assert isinstance(m.value_embeds, torch.nn.ModuleList)
    assert all(isinstance(t, torch.nn.Embedding) and t.weight.shape == (61, 2 * 8) for t in m.value_embeds)
    assert [b.attn.value_mix is not None for b in m.blocks] == [True, True, False, True, True]
    fresh = Transformer(config(value_embeds=2))
    assert fresh.blocks[0].attn.value_mix.tolist() == [0.5, 0.5]  # modded-nanogpt's start: 0.5 v + 0.5 ve


def test_values_are_the_hand_mixed_projection_and_table_row():
    m = model_of(value_embeds=2)
    x = torch.tensor([[5, 17, 42]])
    seen = {}
    for i in (0, 2, 4):  # the normalised input of the attention of a fed, an unfed and a mirrored layer
        m.blocks[i].attn_norm.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out.detach()))
    cache = m.new_cache(1)
    m(x, cache=cache)
    for layer, table in ((0, 0), (2, None), (4, 0)):
        attn = m.blocks[layer].attn
        for pos, token in enumerate(x[0].tolist()):
            v = seen[layer][0, pos] @ attn.v_proj.weight.T
            if table is not None:
                a, b = attn.value_mix.tolist()
                v = a * v + b * m.value_embeds[table].weight[token]
            cached = cache.v[layer, 0, :, pos].reshape(-1)  # (kv heads, head_dim) side by side
            torch.testing.assert_close(cached, v)


# ----------------------------------------------------------------------------- U-net skips


def test_unet_skips_with_zero_weights_are_the_plain_model():
    plain, skipped = model_of(), model_of(unet_skips=True)
    with torch.no_grad():
        skipped.skip_weights.zero_()
    assert skipped.skip_weights.shape == (5 // 2,)
    assert Transformer(config(unet_skips=True)).skip_weights.tolist() == [1.0, 1.0]  # the reference's start
    x = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(skipped(x), plain(x), rtol=0, atol=0)


def test_unet_skips_join_block_k_to_block_n_minus_1_minus_k():
    m = model_of(unet_skips=True)
    inputs, outputs = {}, {}
    for i, block in enumerate(m.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out.detach()))
    m(torch.randint(0, 61, (2, 9)))
    w = m.skip_weights.detach()
    torch.testing.assert_close(inputs[2], outputs[1])  # the middle block of five has no mirror
    torch.testing.assert_close(inputs[3], outputs[2] + w[1] * outputs[1])
    torch.testing.assert_close(inputs[4], outputs[3] + w[0] * outputs[0])


# ----------------------------------------------------------------------------- every option on every path


@pytest.mark.parametrize("options", [*OPTIONS, "all"])
def test_cached_greedy_decoding_equals_full_forwards(options):
    m = model_of(**(ALL if options == "all" else OPTIONS[options]))
    with torch.no_grad():  # zero projections would hide attention (and the values) from the check
        for p in m.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 0.1)
    prompt = torch.tensor([[3, 14, 15, 9, 26], [5, 35, 8, 9, 7]])
    cache = m.new_cache(2)
    logits = m(prompt, cache=cache, last_only=True)[:, -1]
    seq = prompt
    for _ in range(12):
        token = logits.argmax(-1, keepdim=True)
        full = m(seq)[:, -1]  # the whole sequence again, no cache
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert torch.equal(token, full.argmax(-1, keepdim=True))
        seq = torch.cat([seq, token], 1)
        logits = m(token, cache=cache)[:, -1]


def test_parameter_count_by_hand_and_in_model_info(tmp_path, capsys):
    cfg = config(**ALL)
    d, kv, V, n = 32, 2 * 8, 61, 5
    per_block = d * d + 2 * d * kv + d * d + 2 * d * 4 * d + 2 * d   # q, k, v, o; relu2 up and down; two norms
    tables = 2 * V * kv
    scalars = 4 * 2 + n // 2                                           # (a, b) in four layers; two skip weights
    expected = V * d + n * per_block + d + tables + scalars            # tied head; final norm
    assert count_params(cfg) == {"total": expected, "embedding": V * d + tables,
                                 "non_embedding": expected - V * d - tables}
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\ntokenizer = 'its-own'\n[model]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in {**cfg.__dict__, "preset": ""}.items()))
    assert main(["model", "info", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"parameters        {expected:,}" in out
    assert "relu2 MLP, tied embeddings on, logit soft-cap 2, 2 value embeddings, U-net skips, zero-init projections" in out


def test_tiny_pretrain_with_every_option_trains_saves_and_decodes(play_text, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    sets = [f"model.{k}={str(v).lower()}" for k, v in ALL.items()] + ["model.n_layers=4"]
    cfg = load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={play_text}", *tiny_run(
        "train.max_steps=6", "train.checkpoint_every=6", "train.eval_every=0", *sets)])
    from scratchlm.train.pretrain import pretrain

    pretrain(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    run = load(tmp_path / "run")
    m = run.model
    assert m.config.value_embeds == 2 and m.config.unet_skips and m.config.logit_softcap == 2.0
    shapes = model_shapes(m.config)
    assert {"value_embeds.0.weight", "value_embeds.1.weight", "skip_weights", "blocks.0.attn.value_mix"} <= set(shapes)
    assert m.skip_weights.tolist() != [1.0, 1.0]  # trained, then loaded: not the initial values
    x = torch.tensor([run.tokenizer.encode("ROMEO.")])
    cache = m.new_cache(1)
    step = m(x, cache=cache)[:, -1]
    assert step.abs().max() <= 2.0
    torch.testing.assert_close(step, m(x)[:, -1])


# ----------------------------------------------------------------------------- export and config refusals


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("option, blocking", [
    ({"logit_softcap": 30.0}, "model.logit_softcap = 30.0"),
    ({"value_embeds": 1}, "model.value_embeds = 1"),
    ({"unet_skips": True}, "model.unet_skips = true"),
    ({"mlp": "relu2"}, "model.mlp = 'relu2'"),
])
def test_export_refuses_the_speedrun_options_by_name(family, option, blocking, tmp_path):
    shape = ({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"} if family == "llama" else
             {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True})
    cfg = config(**{**shape, "n_kv_heads": 0, **option})
    with pytest.raises(UserError) as e:
        hf_family(cfg)
    assert str(e.value).startswith(blocking) and "\n" not in str(e.value)
    from scratchlm.convert.gguf import write_gguf
    from scratchlm.convert.hf import write_hf

    weights = Transformer(cfg).state_dict()
    for write in (write_hf, write_gguf):
        with pytest.raises(UserError, match=f"^{blocking}"):
            write(Bundle(cfg, weights, None), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zero_init_projections_still_export():
    plain = config(position="rope", norm="rmsnorm", mlp="swiglu")
    zeroed = config(position="rope", norm="rmsnorm", mlp="swiglu", zero_init_proj=True)
    assert hf_family(zeroed) == "llama" and to_hf_config(zeroed) == to_hf_config(plain)


@pytest.mark.parametrize("model, message", [
    ({"value_embeds": 3}, "model.value_embeds = 3 is more than n_layers // 2 = 2"),
    ({"value_embeds": -1}, "model.value_embeds = -1 is out of range"),
    ({"logit_softcap": -1.0}, "model.logit_softcap = -1.0 is out of range"),
    ({"unet_skips": True, "n_layers": 1}, "model.unet_skips = true needs n_layers >= 2"),
    ({"mlp": "relu3"}, "model.mlp = 'relu3' is not one of"),
])
def test_config_refuses_in_one_line(model, message):
    with pytest.raises(UserError) as e:
        config(**model)
    assert str(e.value).startswith(f"config: {message}") and "\n" not in str(e.value)


def test_options_off_add_no_parameters():
    names = set(Transformer(config()).state_dict())
    assert not any("value" in n or "skip" in n for n in names)


def test_growing_the_vocabulary_for_chat_tokens_grows_the_value_tables():
    from scratchlm.chat.template import resize_vocab

    m = model_of(value_embeds=2)
    old = [t.weight.detach().clone() for t in m.value_embeds]
    resize_vocab(m, 64, [61, 62, 63], known=61)
    for table, before in zip(m.value_embeds, old):
        assert table.weight.shape == (64, 16)
        torch.testing.assert_close(table.weight[:61], before)
        torch.testing.assert_close(table.weight[63], before.mean(dim=0))
    assert m(torch.tensor([[1, 62, 63]])).shape == (1, 3, 64)  # the new ids index every table
    assert {k: tuple(v.shape) for k, v in m.state_dict().items() if k != "lm_head.weight"} == model_shapes(m.config)
