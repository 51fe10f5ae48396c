"""GGUF files (llama.cpp's format) for Llama-shaped models: read one, dequantizing, and write one in f32,
f16 or q8_0.

Names: GGUF calls the parts `token_embd`, `blk.N.attn_q`, `ffn_gate`, `output_norm`, `output`, ... and
leaves `output` out when the head is tied to the embedding. Shapes: GGUF lists dimensions fastest first,
which for a row-major (out, in) matrix is (in, out); the `gguf` package turns them around both ways.

Queries and keys: llama.cpp rotates adjacent pairs (x[2i], x[2i+1]), as Meta's original Llama code did,
while scratchlm and transformers rotate (x[i], x[i + d/2]). Attention scores are dot products over a
head's dimensions, so reordering those dimensions the same way in q and k changes nothing; what matters is
that each rotated pair is the same two numbers. GGUF therefore stores the rows of W_q and W_k reordered
within each head from [half, i] to [i, half] (row h*d + half*d/2 + i moves to h*d + 2i + half), which
makes llama.cpp's adjacent pairs our split pairs. Reading undoes it.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from scratchlm.config import ModelConfig
from scratchlm.convert.bundle import Bundle, check_weights
from scratchlm.convert.deps import require
from scratchlm.convert.families import hf_family
from scratchlm.convert.gguf_layout import check_layout
from scratchlm.errors import UserError
from scratchlm.files import fsync_dir, make_dir

_BLOCK = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "mlp_norm.weight",
          "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight",
          "attn_v.weight": "attn.v_proj.weight", "attn_output.weight": "attn.o_proj.weight",
          "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight"}
_TOP = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "final_norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def to_llama_cpp_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from [half, i] to [i, half] (see the module's note)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_llama_cpp_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from [i, half] back to [half, i]."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_name(ours: str) -> str:
    for theirs, name in _TOP.items():
        if name == ours:
            return theirs
    m = re.match(r"^blocks\.(\d+)\.(.+)$", ours)
    for theirs, name in _BLOCK.items():
        if m and name == m.group(2):
            return f"blk.{m.group(1)}.{theirs}"
    raise KeyError(ours)


def _our_name(theirs: str, source: str) -> str:
    if theirs in _TOP:
        return _TOP[theirs]
    m = _BLOCK_NAME.match(theirs)
    if m and m.group(2) in _BLOCK:
        return f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"
    raise UserError(f"{source}: tensor {theirs!r} has no scratchlm counterpart (only plain Llama converts)")


def check_llama(cfg: ModelConfig) -> None:
    if hf_family(cfg) != "llama":
        raise UserError(f"model.position = {cfg.position!r}: GGUF export handles Llama-shaped models "
                        f"(rope, rmsnorm, swiglu)")
    if cfg.bias:
        raise UserError("model.bias = true: GGUF's llama architecture has no biases")


def write_gguf(bundle: Bundle, dst: Path, dtype: str = "f32", replace: bool = False) -> list[str]:
    """Write a GGUF file of architecture 'llama', under a temporary name renamed into place once whole (an
    existing `dst` is refused unless `replace`); returns notes for the user."""
    cfg = bundle.config
    check_llama(cfg)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)} for GGUF")
    gguf = require("gguf", "writing GGUF")
    check_weights(cfg, bundle.weights, bundle.name)
    dst = Path(dst)
    if dst.suffix != ".gguf":
        raise UserError(f"{dst}: a GGUF file's name ends in .gguf")
    if dst.is_dir():
        raise UserError(f"{dst} is a folder; give the path of the .gguf file to write")
    if dst.exists() and not replace:
        raise UserError(f"{dst} already exists: choose another path or pass --force")
    make_dir(dst.parent)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        notes = _write(gguf, bundle, tmp, dtype)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return notes


def _write(gguf, bundle: Bundle, path: Path, dtype: str) -> list[str]:
    cfg = bundle.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(bundle.name)
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPE[dtype])
    notes = _add_tokenizer(w, bundle)
    fallback = []
    for ours, t in bundle.weights.items():
        t = t.detach().float().cpu()
        if ours.endswith("q_proj.weight"):
            t = to_llama_cpp_rows(t, cfg.n_heads)
        elif ours.endswith("k_proj.weight"):
            t = to_llama_cpp_rows(t, cfg.kv_heads)
        name, arr = _gguf_name(ours), t.numpy()
        # Norm gains stay float32 at every dtype, as llama.cpp keeps them: they are tiny and precision-critical.
        if arr.ndim == 1 or dtype == "f32":
            w.add_tensor(name, arr)
        elif dtype == "f16" or arr.shape[-1] % 32:
            if dtype == "q8_0":
                fallback.append(name)
            w.add_tensor(name, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    if fallback:
        notes.append(f"{len(fallback)} tensors kept in f16: q8_0 needs rows that are a multiple of 32 long")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return notes


def _add_tokenizer(w, bundle: Bundle) -> list[str]:
    from scratchlm.convert.vocab import tokenizer_to_gguf

    tok = bundle.tokenizer
    if tok is None:
        return ["no tokenizer written: the source has none"]
    tokens, types, merges = tokenizer_to_gguf(tok, bundle.config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(tok.add_bos)
    for setter, tid in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                        (w.add_pad_token_id, tok.pad_id), (w.add_unk_token_id, tok.unk_id)):
        if tid is not None:
            setter(tid)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)
    notes = []
    if not merges:  # the gguf library writes no empty array, and llama.cpp needs the key
        notes.append("the tokenizer has no merges (single bytes only): llama.cpp refuses a GGUF file without them")
    dropped = [i for i in tok.stop_ids if i != tok.eos_id]
    if dropped:
        notes.append(f"end ids {dropped} besides eos not written: GGUF names one end-of-sequence token")
    return notes


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field we cannot decode is one we do not need
            continue
    return out


def read_gguf(src: Path, chat_template: bool = True) -> Bundle:
    """A GGUF file of architecture 'llama': config from its metadata, every tensor dequantized to float32,
    and the tokenizer with its special tokens and chat template (left out unread without `chat_template`)."""
    from scratchlm.convert.vocab import gguf_settings, tokenizer_from_gguf
    from scratchlm.loading import check_shapes, model_shapes

    gguf = require("gguf", "reading GGUF")
    src = Path(src)
    check_layout(src, gguf.GGML_QUANT_SIZES)  # before gguf's reader believes any count in the file
    try:
        reader = gguf.GGUFReader(str(src))
    except (OSError, ValueError) as e:
        raise UserError(f"{src} cannot be read as GGUF: {e}") from None
    f = _fields(reader)
    arch = f.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{src}: GGUF architecture {arch!r} is not one scratchlm reads (llama)")

    def number(name, default=None, kind=int):
        """Metadata llama.<name>, which must be a positive number (a whole one for `kind` int)."""
        value = f.get(f"llama.{name}", default)
        if value is None:
            raise UserError(f"{src}: metadata llama.{name} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf \
                or kind is int and value != int(value):
            raise UserError(f"{src}: metadata llama.{name} = {value!r} is not a positive "
                            f"{'whole number' if kind is int else 'number'}")
        return kind(value)

    if "llama.rope.scaling.type" in f and f["llama.rope.scaling.type"] not in ("none", "linear") \
            or number("rope.scaling.factor", 1.0, float) != 1.0:
        raise UserError(f"{src}: RoPE scaling has no scratchlm counterpart; only plain RoPE converts")
    if isinstance(f.get("llama.attention.head_count_kv"), list):
        raise UserError(f"{src}: a different number of key/value heads per layer has no scratchlm counterpart")
    d, heads = number("embedding_length"), number("attention.head_count")
    head_dim = number("attention.key_length", max(1, d // heads))
    if head_dim * heads != d or number("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{src}: heads of {head_dim} rotated over {number('rope.dimension_count', head_dim)} "
                        f"dimensions; scratchlm rotates all of d_model / n_heads")
    names = {t.name for t in reader.tensors}
    n_layers = number("block_count")
    # Checked before a model of n_layers is built, even on the meta device: a crafted count could be 10^12.
    blocks = {int(m.group(1)) for m in map(_BLOCK_NAME.match, names) if m}
    if len(blocks) != n_layers or max(blocks, default=-1) != n_layers - 1:
        raise UserError(f"{src}: llama.block_count = {n_layers} but the file holds tensors for {len(blocks)} blocks")
    cfg = ModelConfig(vocab_size=number("vocab_size", len(f.get("tokenizer.ggml.tokens") or []) or None),
                      context=number("context_length"), d_model=d, n_layers=n_layers, n_heads=heads,
                      n_kv_heads=number("attention.head_count_kv", heads), d_ff=number("feed_forward_length"),
                      position="rope", rope_base=number("rope.freq_base", 10000.0, float), norm="rmsnorm",
                      norm_eps=number("attention.layer_norm_rms_epsilon", kind=float), mlp="swiglu",
                      tie_embeddings="output.weight" not in names, bias=False)
    # GGUF lists dimensions fastest first; shapes are checked before any tensor is dequantized.
    shapes = {_our_name(t.name, str(src)): tuple(reversed([int(n) for n in t.shape])) for t in reader.tensors}
    check_shapes(model_shapes(cfg), shapes, str(src), "its metadata")
    weights = {}
    for t in reader.tensors:
        ours = _our_name(t.name, str(src))
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{src}: tensor {t.name} is stored as {t.tensor_type.name}, which gguf cannot "
                            f"dequantize") from None
        w = torch.tensor(np.asarray(arr), dtype=torch.float32)
        if ours.endswith("q_proj.weight"):
            w = from_llama_cpp_rows(w, cfg.n_heads)
        elif ours.endswith("k_proj.weight"):
            w = from_llama_cpp_rows(w, cfg.kv_heads)
        weights[ours] = w.contiguous()
    try:
        tokenizer, note = tokenizer_from_gguf(f, str(src))
    except UserError as e:
        tokenizer, note = None, f"tokenizer not imported: {e}"
    if tokenizer is not None:
        # A bad role or template is refused, not noted: a model that never stops, or chats in the wrong
        # format, is worse than no conversion.
        tokenizer = gguf_settings(f, tokenizer, cfg.vocab_size, str(src), chat_template)
    name = f.get("general.name") or src.stem
    return Bundle(cfg, weights, tokenizer, name=str(name), notes=[note] if note else [])
