"""Run folders: where a run keeps its checkpoints, and loading a checkpoint's weights.

A run folder holds `config.toml`, `tokenizer/` and `checkpoints/step_N/` (see `train/checkpoint.py` for
how they are written). Everything that reads a run (generate, chat, serve, eval, convert) finds its
checkpoint here, without importing the training package.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from scratchlm.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for either a run folder (its latest checkpoint) or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "model.safetensors").exists():
        return path.parent.parent, path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/model.safetensors)")
    return path, found[-1]


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    weights = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied output head may be stored once, under the embedding's name.
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{ckpt_dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


