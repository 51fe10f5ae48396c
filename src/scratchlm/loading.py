"""`scratchlm.load`: a trained model, its tokenizer and its config, from a run or checkpoint folder.

Every path that reads a model's weights from disk (generate, chat, serve, eval, attention, fine-tuning's
`sft.init`, resuming a run, converting) goes through `read_weights`, which trusts nothing in the file:
the safetensors header is checked against the file's size, and the tensors it declares against the
shapes the config builds, before a byte of weights is read or a parameter is allocated.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scratchlm.config import ModelConfig, RunConfig, load_config
from scratchlm.errors import UserError
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.rundir import resolve_checkpoint

# The safetensors dtypes torch can hold, and their sizes in bytes.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    config: RunConfig
    checkpoint: Path


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load a run folder (its latest checkpoint) or one checkpoint folder, in eval mode."""
    run_dir, ckpt_dir = resolve_checkpoint(path)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} has no config.toml; is it a scratchlm run folder?")
    config = load_config(config_path)
    weights = read_weights(ckpt_dir, config.model, config_path)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = Transformer(config.model)
    model.load_state_dict(weights, strict=False)  # names and shapes are checked; a tied head is stored once
    return Loaded(model.to(device).eval(), tokenizer, config, ckpt_dir)


def load_weights(model: Transformer, ckpt_dir: Path) -> None:
    """Put a checkpoint's weights into `model` (resuming a run)."""
    config_path = Path(ckpt_dir).parent.parent / "config.toml"
    model.load_state_dict(read_weights(ckpt_dir, model.config, config_path), strict=False)


def read_weights(ckpt_dir: Path, cfg: ModelConfig, config_name: str | Path = "the config") -> dict[str, torch.Tensor]:
    """A checkpoint's `model.safetensors`, once its header has been checked against the file and every
    tensor's name and shape against the model `cfg` builds. A tied output head is left out."""
    path = Path(ckpt_dir) / "model.safetensors"
    found = safetensors_shapes(path)
    if cfg.tie_embeddings:
        found.pop("lm_head.weight", None)
    check_shapes(model_shapes(cfg), found, str(path), str(config_name))
    try:
        weights = load_file(str(path))
    except SafetensorError as e:  # anything the header check above lets through
        raise UserError(f"{path} cannot be read as safetensors: {e}") from None
    return {k: v for k, v in weights.items() if k in found}


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a Transformer of `cfg` has, with its shape, without allocating it; a tied output
    head is left out, since the embedding holds it."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str,
                 config_name: str = "the config") -> None:
    """The same tensor names as `expected`, each with its shape; else one line naming the first that differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit {config_name} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise UserError(f"{source}: {name} has shape {tuple(found[name])} but {config_name} makes it {shape}")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a safetensors file declares (name -> shape), once its header has been checked against
    the file: a length that fits, JSON that parses, known dtypes, and byte ranges that lie inside the file
    and match each tensor's dtype and shape. Reads the header only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; the checkpoint has no weights")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise UserError(f"{path} is {size} bytes, too short for a safetensors file (truncated or empty)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise UserError(f"{path}: the header claims {header_len} bytes but the file has {size - 8} after "
                            f"its length (truncated or not safetensors)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path}: the header is not valid JSON (corrupted or not safetensors)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the header is not a JSON object (corrupted or not safetensors)")
    data_size = size - 8 - header_len
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = _tensor_shape(path, name, info, data_size)
    return shapes


def _tensor_shape(path: Path, name: str, info, data_size: int) -> tuple[int, ...]:
    """One header entry's shape, after checking that its dtype, shape and byte range agree."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: tensor {name!r} is described by {info!r}, not a dtype, shape and offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, not one of {', '.join(_ITEMSIZE)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise UserError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise UserError(f"{path}: tensor {name!r} ends at byte {end} of the data but there are only {data_size} "
                        f"(truncated file)")
    need = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != need:
        raise UserError(f"{path}: tensor {name!r} is {dtype} of shape {tuple(shape)} ({need} bytes) but spans "
                        f"{end - begin} bytes")
    return tuple(shape)
