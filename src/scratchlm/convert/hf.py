"""Hugging Face folders: write one that `transformers.AutoModelForCausalLM.from_pretrained` loads, and
read one (Llama or GPT-2) into scratchlm's parameter names.

Llama's layout is scratchlm's own, name for name: both rotate the pairs (x[i], x[i + d/2]) ("rotate half"),
so query and key rows go across unpermuted. GPT-2 differs in two ways. Its linear layers are `Conv1D`
modules that store the weight as (in, out), the transpose of `nn.Linear`; and one `c_attn` projection
makes queries, keys and values together, its output columns laid out as [q | k | v].
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from scratchlm.config import ModelConfig
from scratchlm.convert.bundle import Bundle, check_weights
from scratchlm.convert.deps import require
from scratchlm.convert.families import from_hf_config, hf_family, to_hf_config
from scratchlm.errors import UserError
from scratchlm.files import atomic_dir

_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}.{t}": f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")},
}


def llama_names(cfg: ModelConfig) -> dict[str, str]:
    """scratchlm name -> Llama name, for every parameter the config has."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_BLOCK.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def to_llama(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    names = llama_names(cfg)
    return {names[k]: v for k, v in weights.items()}


def from_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    back = {theirs: ours for ours, theirs in llama_names(cfg).items()}
    # Rotary tables are recomputed from the config, never learned; some old checkpoints store them.
    return {back.get(k, k): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


def to_gpt2(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    d = cfg.d_model

    def bias(name: str, size: int) -> torch.Tensor:
        return weights.get(name, torch.zeros(size))

    out = {"transformer.wte.weight": weights["tok_emb.weight"], "transformer.wpe.weight": weights["pos_emb.weight"],
           "transformer.ln_f.weight": weights["final_norm.weight"], "transformer.ln_f.bias": bias("final_norm.bias", d)}
    if "lm_head.weight" in weights:
        out["lm_head.weight"] = weights["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        w = lambda name: weights[ours + name]  # noqa: E731
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[theirs + f"{b}.weight"] = w(f"{a}.weight")
            out[theirs + f"{b}.bias"] = bias(ours + f"{a}.bias", d)
        out[theirs + "attn.c_attn.weight"] = torch.cat([w("attn.q_proj.weight"), w("attn.k_proj.weight"),
                                                        w("attn.v_proj.weight")]).T.contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat([bias(ours + f"attn.{p}_proj.bias", d) for p in "qkv"])
        out[theirs + "attn.c_proj.weight"] = w("attn.o_proj.weight").T.contiguous()
        out[theirs + "attn.c_proj.bias"] = bias(ours + "attn.o_proj.bias", d)
        out[theirs + "mlp.c_fc.weight"] = w("mlp.up.weight").T.contiguous()
        out[theirs + "mlp.c_fc.bias"] = bias(ours + "mlp.up.bias", cfg.ffn_hidden)
        out[theirs + "mlp.c_proj.weight"] = w("mlp.down.weight").T.contiguous()
        out[theirs + "mlp.c_proj.bias"] = bias(ours + "mlp.down.bias", d)
    return out


def from_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        theirs, ours = f"h.{i}.", f"blocks.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[ours + f"{a}.weight"], out[ours + f"{a}.bias"] = sd[theirs + f"{b}.weight"], sd[theirs + f"{b}.bias"]
        q, k, v = sd[theirs + "attn.c_attn.weight"].T.chunk(3)
        qb, kb, vb = sd[theirs + "attn.c_attn.bias"].chunk(3)
        for p, wt, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[ours + f"attn.{p}_proj.weight"], out[ours + f"attn.{p}_proj.bias"] = wt.contiguous(), b
        out[ours + "attn.o_proj.weight"] = sd[theirs + "attn.c_proj.weight"].T.contiguous()
        out[ours + "attn.o_proj.bias"] = sd[theirs + "attn.c_proj.bias"]
        out[ours + "mlp.up.weight"] = sd[theirs + "mlp.c_fc.weight"].T.contiguous()
        out[ours + "mlp.up.bias"] = sd[theirs + "mlp.c_fc.bias"]
        out[ours + "mlp.down.weight"] = sd[theirs + "mlp.c_proj.weight"].T.contiguous()
        out[ours + "mlp.down.bias"] = sd[theirs + "mlp.c_proj.bias"]
    return out


def write_hf(bundle: Bundle, dst: Path, dtype: torch.dtype = torch.float32, replace: bool = False) -> list[str]:
    """Write `dst` as a transformers model folder, built beside it and renamed into place whole (an existing
    non-empty `dst` is refused unless `replace`); returns notes for the user."""
    cfg = bundle.config
    family = hf_family(cfg)  # refuses before the slow import of transformers
    transformers = require("transformers", "converting to Hugging Face format")
    check_weights(cfg, bundle.weights, bundle.name)
    kwargs = to_hf_config(cfg)
    kwargs.pop("model_type")
    tok = bundle.tokenizer
    if tok is not None:
        kwargs.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if family == "llama":
        hf_cfg, model_cls, sd = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM, to_llama(bundle.weights, cfg)
    else:
        hf_cfg, model_cls, sd = transformers.GPT2Config(**kwargs), transformers.GPT2LMHeadModel, to_gpt2(bundle.weights, cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = bundle.weights["tok_emb.weight"]
    with torch.device("meta"):
        model = model_cls(hf_cfg)
    # assign=True takes our tensors as they are, so a large model is never held twice; strict loading
    # proves every name and shape matches what transformers builds.
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    if tok is not None:
        # transformers' generate stops at the generation config's eos, which may list several ids.
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
            eos_token_id=list(tok.eos_list) if tok.eos_list is not None else tok.eos_id)
    notes = []
    with atomic_dir(Path(dst), replace=replace) as tmp:
        model.save_pretrained(tmp)
        if bundle.tokenizer is not None:
            notes.append(_write_tokenizer(bundle, tmp))
    return [n for n in notes if n]


def _write_tokenizer(bundle: Bundle, dst: Path) -> str:
    tok = bundle.tokenizer
    save_hf = getattr(tok, "save_hf", None) or getattr(tok, "to_hf", None)
    if save_hf is None:
        return "tokenizer not written: scratchlm cannot yet save a tokenizer in Hugging Face format"
    save_hf(dst)
    return ""


def read_hf(src: Path, chat_template: bool = True) -> Bundle:
    """A Hugging Face folder of model_type llama or gpt2: config, weights and, when it is byte-level BPE,
    the tokenizer with its special tokens and chat template (left out unread without `chat_template`)."""
    from scratchlm.convert.vocab import hf_settings, tokenizer_from_hf_folder

    src = Path(src)
    try:
        hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{src}/config.json cannot be read: {e}") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{src}/config.json is not a JSON object; is it a Hugging Face model folder?")
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "gpt2"):
        raise UserError(f"{src}: model_type {model_type!r} is not one scratchlm converts; it reads llama and gpt2")
    _check_weight_files(src)
    transformers = require("transformers", "reading a Hugging Face model")
    try:
        cfg = from_hf_config(transformers.AutoConfig.from_pretrained(src))
        # Mismatched and missing weights are reported rather than raised or filled with random numbers,
        # so that the line below can name them.
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{src}: transformers cannot load it: {first_line}") from None
    _check_loading_info(src, info)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    weights = from_llama(sd, cfg) if model_type == "llama" else from_gpt2(sd, cfg)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    check_weights(cfg, weights, str(src))
    try:
        tokenizer, note = tokenizer_from_hf_folder(src)
    except UserError as e:
        tokenizer, note = None, f"tokenizer not imported: {e}"
    if tokenizer is not None:
        tokenizer = hf_settings(src, tokenizer, cfg.vocab_size, chat_template)
    return Bundle(cfg, weights, tokenizer, name=src.name, notes=[note] if note else [])


def _check_weight_files(src: Path) -> None:
    """A folder with weights, each safetensors file's header sound, before transformers reads any."""
    from scratchlm.loading import safetensors_shapes

    files = sorted(src.glob("*.safetensors")) + sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{src} holds no weights (model.safetensors or pytorch_model.bin); is the download complete?")
    for path in files:
        if path.suffix == ".safetensors":
            safetensors_shapes(path)


def _check_loading_info(src: Path, info: dict) -> None:
    """Refuse a folder whose weights and config.json disagree, naming the first tensor that does."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        name, stored, needed = mismatched[0]
        raise UserError(f"{src}: {name} has shape {tuple(stored)} but config.json makes it {tuple(needed)}")
    missing = sorted(k for k in info.get("missing_keys") or () if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise UserError(f"{src}: config.json needs weights the folder lacks: {', '.join(missing[:3])}")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise UserError(f"{src}: the weights hold tensors config.json has no place for: {', '.join(unexpected[:3])}")
