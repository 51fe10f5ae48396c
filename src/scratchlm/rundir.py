"""Run folders: where a run keeps its checkpoints.

A run folder holds `config.toml`, `tokenizer/` and `checkpoints/step_N/` (see `train/checkpoint.py` for
how they are written). Everything that reads a run (generate, chat, serve, eval, convert) finds its
checkpoint here, without importing the training package.
"""
from __future__ import annotations

import re
from pathlib import Path


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
