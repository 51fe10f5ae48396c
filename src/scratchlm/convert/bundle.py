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
from scratchlm.files import atomic_dir
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
    from scratchlm.loading import check_shapes, model_shapes

    check_shapes(model_shapes(cfg), {k: tuple(v.shape) for k, v in weights.items()}, source, "the model")


def read_run(path: Path) -> Bundle:
    """A scratchlm run folder (its latest checkpoint) or one checkpoint folder."""
    from scratchlm.config import load_config
    from scratchlm.loading import read_weights
    from scratchlm.rundir import resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(path)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} has no config.toml; is it a scratchlm run folder?")
    cfg = load_config(config_path).model
    weights = {k: v.float() for k, v in read_weights(ckpt, cfg, config_path).items()}
    tok_dir = run_dir / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        from scratchlm.chat.template import with_chat_roles

        tokenizer = with_chat_roles(tokenizer)  # a chat run from before tokenizers carried their template
    return Bundle(cfg, weights, tokenizer, name=run_dir.name)


def write_run(bundle: Bundle, dst: Path, dtype: torch.dtype = torch.float32, replace: bool = False) -> Path:
    """A run folder with config.toml, tokenizer/ and checkpoints/step_00000000/, which `scratchlm.load`,
    `generate`, `eval` and fine-tuning read like any trained run. It is built beside `dst` and renamed into
    place whole; an existing non-empty `dst` is refused unless `replace`."""
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
    run = RunConfig()
    run.model = bundle.config
    run.data.vocab_size = bundle.tokenizer.vocab_size
    run.data.special_tokens = sorted(bundle.tokenizer.special_tokens, key=bundle.tokenizer.special_tokens.get)
    weights = {k: v.to(dtype) for k, v in bundle.weights.items()}
    dst = Path(dst)
    with atomic_dir(dst, replace=replace) as tmp:
        run.save(tmp / "config.toml")
        bundle.tokenizer.save(tmp / "tokenizer")
        save_checkpoint(tmp, 0, weights, None, {"tokens": 0, "converted_from": bundle.name}, keep=1)
    return dst
