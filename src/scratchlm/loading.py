"""`scratchlm.load`: a trained model, its tokenizer and its config, from a run or checkpoint folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm.config import RunConfig, load_config
from scratchlm.errors import UserError
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.rundir import load_weights, resolve_checkpoint


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
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = Transformer(config.model)
    load_weights(model, ckpt_dir)
    return Loaded(model.to(device).eval(), tokenizer, config, ckpt_dir)
