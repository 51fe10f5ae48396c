"""Which Hugging Face architecture a scratchlm config is, and the two configs translated both ways.

Two families cover what the transformers library can load without custom code:

- Llama: RoPE, RMSNorm, SwiGLU, pre-norm, any n_kv_heads (MHA, GQA, MQA), biases on or off.
- GPT-2: learned positions, LayerNorm, tanh-approximated GELU MLP, pre-norm, one key/value head per query
  head. GPT-2 always has biases; a scratchlm model without them is the same model with zero biases.

Any other choice has no counterpart in either, and is refused by naming the option that blocks it.
"""
from __future__ import annotations

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError

# The speedrun options (logit_softcap, value_embeds, unet_skips) change the forward pass; neither family has them.
_PLAIN = {"logit_softcap": 0.0, "value_embeds": 0, "unet_skips": False}
LLAMA_NEEDS = {"norm": "rmsnorm", "mlp": "swiglu", "pre_norm": True, "qk_norm": False, **_PLAIN}
GPT2_NEEDS = {"norm": "layernorm", "mlp": "gelu", "pre_norm": True, "qk_norm": False, **_PLAIN}


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def hf_family(cfg: ModelConfig) -> str:
    """'llama' or 'gpt2', or a UserError naming the first option neither family can express."""
    if cfg.position == "rope":
        family, needs = "llama", LLAMA_NEEDS
    elif cfg.position == "learned":
        family, needs = "gpt2", GPT2_NEEDS
    else:
        raise UserError(f"model.position = {cfg.position!r} has no Hugging Face counterpart: Llama needs "
                        f"'rope' and GPT-2 needs 'learned'")
    label = "Llama" if family == "llama" else "GPT-2"
    for key, value in needs.items():
        if getattr(cfg, key) != value:
            raise UserError(f"model.{key} = {_toml(getattr(cfg, key))} has no Hugging Face counterpart: "
                            f"{label} (the family of model.position = {cfg.position!r}) needs {_toml(value)}")
    if family == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise UserError(f"model.n_kv_heads = {cfg.n_kv_heads} has no Hugging Face counterpart: GPT-2 has one "
                        f"key/value head per query head (set it to 0 or {cfg.n_heads})")
    return family


def to_hf_config(cfg: ModelConfig) -> dict:
    """The keyword arguments of transformers' LlamaConfig or GPT2Config, plus 'model_type'."""
    family = hf_family(cfg)
    if family == "llama":
        return dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                    intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                    max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                    rope_theta=cfg.rope_base, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                    tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model,
                n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_hidden, activation_function="gelu_new",
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _get(hf, key, default=None):
    return hf.get(key, default) if isinstance(hf, dict) else getattr(hf, key, default)


def _rope_theta(hf) -> float:
    # transformers 5 keeps rope_theta inside rope_parameters; older configs have it at the top level.
    params = _get(hf, "rope_parameters") or {}
    scaling = _get(hf, "rope_scaling") or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    kind = scaling.get("rope_type", scaling.get("type", kind)) if isinstance(scaling, dict) else kind
    if kind not in ("default", None):
        raise UserError(f"rope_type {kind!r} (RoPE scaling) has no scratchlm counterpart; only plain RoPE converts")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else _get(hf, "rope_theta", 10000.0))


def from_hf_config(hf) -> ModelConfig:
    """A ModelConfig from a transformers config object (or its dict) of model_type llama or gpt2."""
    kind = _get(hf, "model_type")
    tie = bool(_get(hf, "tie_word_embeddings", True))
    if kind == "llama":
        d, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
        head_dim = _get(hf, "head_dim") or d // heads
        if head_dim * heads != d:
            raise UserError(f"head_dim = {head_dim} with {heads} heads is not hidden_size {d}; scratchlm derives "
                            f"the head size from d_model / n_heads")
        if _get(hf, "hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act = {_get(hf, 'hidden_act')!r}: scratchlm's SwiGLU gates with silu")
        if bool(_get(hf, "attention_bias", False)) != bool(_get(hf, "mlp_bias", False)):
            raise UserError("attention_bias and mlp_bias differ; scratchlm has one model.bias for both")
        return ModelConfig(vocab_size=_get(hf, "vocab_size"), context=_get(hf, "max_position_embeddings"),
                           d_model=d, n_layers=_get(hf, "num_hidden_layers"), n_heads=heads,
                           n_kv_heads=_get(hf, "num_key_value_heads") or heads,
                           d_ff=_get(hf, "intermediate_size"), position="rope", rope_base=_rope_theta(hf),
                           norm="rmsnorm", norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), mlp="swiglu",
                           tie_embeddings=tie, bias=bool(_get(hf, "attention_bias", False)))
    if kind == "gpt2":
        act = _get(hf, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"activation_function = {act!r}: scratchlm's GELU is the tanh approximation "
                            f"(gelu_new)")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if _get(hf, flag, False):
                raise UserError(f"{flag} = true has no scratchlm counterpart")
        if not _get(hf, "scale_attn_weights", True):
            raise UserError("scale_attn_weights = false has no scratchlm counterpart")
        d = _get(hf, "n_embd")
        return ModelConfig(vocab_size=_get(hf, "vocab_size"), context=_get(hf, "n_positions"), d_model=d,
                           n_layers=_get(hf, "n_layer"), n_heads=_get(hf, "n_head"), n_kv_heads=0,
                           d_ff=_get(hf, "n_inner") or 4 * d, position="learned", norm="layernorm",
                           norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), mlp="gelu", bias=True,
                           tie_embeddings=tie)
    raise UserError(f"model_type {kind!r} is not one scratchlm converts; it reads llama and gpt2")
