"""Model interchange: scratchlm run folders, Hugging Face folders and GGUF files, each way.

`convert(src, dst, to)` reads the source into a `Bundle` (config, weights under scratchlm's names,
tokenizer) and writes the bundle in the target format, so every pair of formats goes through one shape.
transformers and gguf are imported only when a conversion needs them (`pip install 'scratchlm[hf]'`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.convert.bundle import Bundle, read_run, write_run
from scratchlm.errors import UserError

TARGETS = ("hf", "scratchlm", "gguf")
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16}


def source_format(src: Path) -> str:
    """'gguf', 'hf' or 'scratchlm', from what the path holds."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} not found")
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise UserError(f"{src} is a file but not GGUF; give a GGUF file, a Hugging Face folder or a run folder")
    if (src / "config.json").is_file():
        return "hf"
    if (src / "config.toml").is_file() or (src / "model.safetensors").is_file() or (src / "checkpoints").is_dir():
        return "scratchlm"
    raise UserError(f"{src} is neither a scratchlm run folder (config.toml), a Hugging Face folder "
                    f"(config.json) nor a GGUF file")


def read(src: Path, tokenizer: Path | None = None, chat_template: bool = True) -> Bundle:
    """Any supported source as a Bundle; `tokenizer` (a scratchlm tokenizer folder) replaces its own.
    Without `chat_template` the source's chat template is neither checked nor carried over."""
    kind = source_format(src)
    if kind == "gguf":
        from scratchlm.convert.gguf import read_gguf

        bundle = read_gguf(src, chat_template)
    elif kind == "hf":
        from scratchlm.convert.hf import read_hf

        bundle = read_hf(src, chat_template)
    else:
        bundle = read_run(src)
    if tokenizer is not None:
        from scratchlm.tokenizer import Tokenizer

        bundle.tokenizer = Tokenizer.load(tokenizer)
        bundle.notes = [n for n in bundle.notes if "tokenizer" not in n]
    if not chat_template:
        if bundle.tokenizer is not None:
            bundle.tokenizer = bundle.tokenizer.with_roles(chat_template=None)
        bundle.notes.append("chat template left out (--no-chat-template)")
    return bundle


def check_destination(src: Path, dst: Path, force: bool = False) -> None:
    """Refuse, before the source is read, a destination that is or holds the source (replacing it would
    destroy the source), and one that already holds something unless `force`."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or dst in src.parents:
        raise UserError(f"{dst} is where the source {src} lies; write the export to another path")
    if dst.exists() and not force and (dst.is_file() or any(dst.iterdir())):
        raise UserError(f"{dst} already exists and is not empty: choose another path or pass --force")


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "f32",
            tokenizer: str | Path | None = None, force: bool = False, chat_template: bool = True) -> list[str]:
    """Convert `src` into format `to` at `dst`; returns notes on anything that could not be carried over.
    The export is built under a temporary name and renamed into place whole, so `dst` never holds half
    of one; an existing `dst` is replaced only with `force`. The tokenizer's special tokens and chat
    template go along; `chat_template=False` leaves the template out (for a source whose template is
    broken)."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise UserError(f"--to {to} is not one of {', '.join(TARGETS)}")
    if to != "gguf" and dtype not in _TORCH_DTYPES:
        raise UserError(f"--dtype {dtype} is for GGUF only; --to {to} takes f32 or f16")
    if to == source_format(src):
        raise UserError(f"{src} is already in {to} format")
    check_destination(src, dst, force)
    bundle = read(src, Path(tokenizer) if tokenizer else None, chat_template)
    notes = list(bundle.notes)
    if to == "hf":
        from scratchlm.convert.hf import write_hf

        notes += write_hf(bundle, dst, _TORCH_DTYPES[dtype], replace=force)
    elif to == "gguf":
        from scratchlm.convert.gguf import write_gguf

        notes += write_gguf(bundle, dst, dtype, replace=force)
    else:
        write_run(bundle, dst, _TORCH_DTYPES[dtype], replace=force)
    return notes


__all__ = ["Bundle", "TARGETS", "check_destination", "convert", "read", "read_run", "source_format", "write_run"]
