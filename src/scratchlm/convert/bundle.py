"""What every converter passes along: a model config, its weights under scratchlm's parameter names, and
the tokenizer when there is one. Readers make a `Bundle` from a file format, writers turn one into a file
format, so any source converts to any target through this one shape.

This module also reads and writes the scratchlm side: a run folder that `scratchlm.load` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scratchlm.config import ModelConfig, RunConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer


@dataclass
class Bundle:
    config: ModelConfig
    weights: dict[str, torch.Tensor]           # scratchlm names; a tied output head is left out
    tokenizer: Tokenizer | None = None
    name: str = "model"
    notes: list[str] = field(default_factory=list)  # what the reader could not carry over, for the user


def check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    """Every parameter a Transformer of this config has, with its shape, and nothing else."""
    from scratchlm.model.transformer import Transformer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise UserError(f"{source}: {k} has shape {tuple(weights[k].shape)}, the model needs {shape}")


def read_run(path: Path) -> Bundle:
    """A scratchlm run folder (its latest checkpoint) or one checkpoint folder."""
    from safetensors.torch import load_file

    from scratchlm.config import load_config
    from scratchlm.rundir import resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(path)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} has no config.toml; is it a scratchlm run folder?")
    cfg = load_config(run_dir / "config.toml").model
    weights = {k: v.float() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    check_weights(cfg, weights, str(ckpt))
    tok_dir = run_dir / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    return Bundle(cfg, weights, tokenizer, name=run_dir.name)


def write_run(bundle: Bundle, dst: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A run folder with config.toml, tokenizer/ and checkpoints/step_00000000/, which `scratchlm.load`,
    `generate`, `eval` and fine-tuning read like any trained run."""
    from scratchlm.train.checkpoint import save_checkpoint

    if bundle.tokenizer is None:
        why = next((n for n in bundle.notes if "tokenizer" in n), "")
        raise UserError(f"{bundle.name} carries no tokenizer scratchlm can read{f' ({why})' if why else ''}, and "
                        f"a run folder needs one; give one with --tokenizer DIR")
    tok, n = bundle.tokenizer, bundle.config.vocab_size
    # Ids past the embedding table are allowed only for single bytes the source vocabulary lacked.
    if any(len(tok.id_to_bytes(i)) != 1 or i in tok.special_tokens.values() for i in range(n, tok.vocab_size)):
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {n} embeddings")
    check_weights(bundle.config, bundle.weights, bundle.name)
    dst = Path(dst)
    if (dst / "checkpoints").exists():
        raise UserError(f"{dst} already holds checkpoints; choose an empty folder")
    dst.mkdir(parents=True, exist_ok=True)
    run = RunConfig()
    run.model = bundle.config
    run.data.vocab_size = bundle.tokenizer.vocab_size
    run.data.special_tokens = sorted(bundle.tokenizer.special_tokens, key=bundle.tokenizer.special_tokens.get)
    run.save(dst / "config.toml")
    bundle.tokenizer.save(dst / "tokenizer")
    weights = {k: v.to(dtype) for k, v in bundle.weights.items()}
    save_checkpoint(dst, 0, weights, None, {"tokens": 0, "converted_from": bundle.name}, keep=1)
    return dst
