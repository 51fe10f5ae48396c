"""The model against references written independently of it: torch.nn.functional, complex-number RoPE,
the ALiBi paper's slopes, hand-computed tables and GPT-2's published parameter count."""
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import build_config, preset_config
from scratchlm.model.attention import CausalSelfAttention
from scratchlm.model.info import count_params
from scratchlm.model.layers import RMSNorm, SwiGLU
from scratchlm.model.positions import alibi_slopes, apply_rope, rope_angles, rope_tables, sinusoidal_table
from scratchlm.model.transformer import Transformer

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "nope"]


def small_model(**model):
    cfg = build_config({"model": {"vocab_size": 97, "context": 32, "d_model": 48, "n_layers": 2, "n_heads": 4, **model}}).model
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_rmsnorm_matches_the_formula_in_float64_and_keeps_bf16_in_float32_inside():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    xd, wd = x.double(), norm.weight.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    torch.testing.assert_close(norm(x), expected.float())
    # large bf16 inputs: squares past bf16's precision must not spoil the result (computed in float32)
    big = (x * 300).bfloat16()
    bd = big.double()
    ref = (bd / torch.sqrt(bd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd).bfloat16()
    assert norm(big).dtype == torch.bfloat16
    torch.testing.assert_close(norm(big), ref, atol=0, rtol=1e-2)


def test_swiglu_by_hand():
    mlp = SwiGLU(8, 12)
    x = torch.randn(4, 8)
    expected = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_rope_matches_complex_rotation():
    T, d = 7, 8
    x = torch.randn(2, 3, T, d)
    pos = torch.arange(T)
    out = apply_rope(x, *rope_angles(pos, d, base=10000.0))
    # Independent form: the pair (x_i, x_{i+d/2}) as one complex number, turned by pos * base^(-2i/d).
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    rotated = z * torch.polar(torch.ones(T, d // 2), pos[:, None].float() * theta)
    torch.testing.assert_close(out, torch.cat([rotated.real, rotated.imag], dim=-1))
    # The model's full-width tables give the same rotation.
    torch.testing.assert_close(apply_rope(x, *rope_tables(pos, d, base=10000.0)), out, rtol=0, atol=0)


def test_rope_scores_depend_only_on_distance():
    d = 16
    q, k = torch.randn(d), torch.randn(d)
    def score(i, j):
        cq, sq = rope_angles(torch.tensor([i]), d)
        ck, sk = rope_angles(torch.tensor([j]), d)
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()
    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-4)


def test_alibi_slopes_of_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    # 12 heads: the 8 slopes for 8 heads, then slopes 1, 3, 5, 7 (0-based) of the 16-head sequence.
    sixteen = [2 ** (-(i + 1) / 2) for i in range(16)]
    assert alibi_slopes(12).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4])


def test_sinusoidal_table_by_hand():
    table = sinusoidal_table(3, 4)
    assert table[2].tolist() == pytest.approx([math.sin(2), math.cos(2), math.sin(2 / 100), math.cos(2 / 100)], abs=1e-6)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_sdpa_reference(n_kv_heads):
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, n_kv_heads, backend="explicit").eval()
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)
    B, T, hd = 2, 9, 8
    q = (x @ attn.q_proj.weight.T).view(B, T, 4, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, n_kv_heads, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, n_kv_heads, hd).transpose(1, 2)
    k, v = (t.repeat_interleave(4 // n_kv_heads, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(attn(x, pos), ref, atol=1e-5, rtol=1e-5)
    attn.backend = "sdpa"
    torch.testing.assert_close(attn(x, pos), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_no_peeking_at_the_future(position):
    model = small_model(position=position)
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :12], model(y)[:, :12])
    assert not torch.allclose(model(x)[:, 12:], model(y)[:, 12:])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_kv_cache_matches_full_forward_and_explicit_path(position, n_kv_heads):
    model = small_model(position=position, n_kv_heads=n_kv_heads)
    x = torch.randint(0, 97, (2, 18))
    full = model(x)
    cache = model.new_cache(2)
    stepped = torch.cat([model(x[:, :6], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(6, 18)], 1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)
    for block in model.blocks:
        block.attn.backend = "explicit"
    torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-4)


def test_logits_shape_and_weight_tying():
    model = small_model()
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 97)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = small_model(tie_embeddings=False)
    assert untied.num_params() == model.num_params() + 97 * 48


def test_post_norm_and_layernorm_and_gelu_run_and_learn():
    model = small_model(pre_norm=False, norm="layernorm", mlp="gelu", bias=True, dropout=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_gpt2_preset_has_gpt2_parameter_count():
    # Hugging Face's GPT2LMHeadModel reports 124,439,808 parameters for "gpt2".
    assert count_params(preset_config("gpt2-124m"))["total"] == 124_439_808


def test_qt1b_is_the_seed_model():
    # The seed's model: 1.01B parameters.
    assert round(count_params(preset_config("qt-1b"))["total"] / 1e9, 2) == 1.01


def test_residual_projections_are_scaled_at_init():
    model = small_model(n_layers=8, d_model=64)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", [
    dict(n_kv_heads=1, qk_norm=True), dict(pre_norm=False, norm="layernorm", mlp="gelu", bias=True),
    dict(n_kv_heads=2, mlp="relu", attention="explicit"), dict(mlp="silu", tie_embeddings=False, attention="explicit"),
])
def test_no_peeking_for_any_option_combination(position, variant):
    model = small_model(position=position, **variant)
    x = torch.randint(0, 97, (2, 20))
    for cut in (1, 9, 19):
        y = x.clone()
        y[:, cut:] = torch.randint(0, 97, y[:, cut:].shape)
        torch.testing.assert_close(model(x)[:, :cut], model(y)[:, :cut])


def test_n_kv_heads_equal_to_n_heads_is_multi_head_attention():
    mha, gqa_as_mha = small_model(n_kv_heads=0), small_model(n_kv_heads=4)
    assert mha.state_dict().keys() == gqa_as_mha.state_dict().keys()
    gqa_as_mha.load_state_dict(mha.state_dict())
    x = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(gqa_as_mha(x), mha(x), rtol=0, atol=0)
    # And one kv head per query head computes what F.multi_head_attention_forward (no sharing) computes.
    attn = mha.blocks[0].attn
    h = torch.randn(1, 7, 48)
    ref, _ = F.multi_head_attention_forward(
        h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), 48, 4, None, None, None, None, False, 0.0,
        attn.o_proj.weight, None, training=False, need_weights=False,
        attn_mask=torch.ones(7, 7, dtype=torch.bool).triu(1), use_separate_proj_weight=True,
        q_proj_weight=attn.q_proj.weight, k_proj_weight=attn.k_proj.weight, v_proj_weight=attn.v_proj.weight)
    torch.testing.assert_close(attn(h, torch.arange(7)), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)
