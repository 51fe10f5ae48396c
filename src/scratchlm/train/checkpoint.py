"""Checkpoints that survive a crash at any moment and hold everything needed to resume exactly.

Layout of a run folder:

    config.toml            resolved config
    tokenizer/             the tokenizer the run was trained with
    metrics.jsonl          one JSON object per logged step
    checkpoints/step_00001234/
        model.safetensors      weights (no pickle anywhere)
        optimizer.safetensors  optimizer tensors, flattened
        state.json             step, tokens, optimizer hyper-parameters, loader and RNG states

A checkpoint is written under a temporary name, every file fsynced, then renamed into place, so a
reader sees either the whole checkpoint or none of it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scratchlm.errors import UserError
from scratchlm.files import fsync_dir
from scratchlm.loading import safetensors_shapes
from scratchlm.rundir import list_checkpoints

def rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict keyed by parameter name into flat tensors (for safetensors) and the
    rest (for JSON)."""
    tensors, scalars = {}, {}
    for name, slots in sd["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{slot}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{slot}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two names for one tensor (a tied output head): keep the first name."""
    seen, out = set(), {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor] | torch.nn.Module,
                    optimizer_state: dict | None, state: dict, keep: int = 2, protect: int | None = None) -> Path:
    """Write checkpoints/step_N atomically and prune all but the last `keep` (and the `protect` step).

    `weights` is a module or its (full) state dict; `optimizer_state` is keyed by parameter name, as
    `train.distributed.full_optimizer_state` gives it."""
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_unshared(weights), str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        tensors, meta = _optimizer_tensors(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "optimizer": meta}
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_state()}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    kept = list_checkpoints(run_dir)
    for old in kept[:-keep] if keep > 0 else []:
        if protect is None or old.name != f"step_{protect:08d}":
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(ckpt_dir: Path) -> dict:
    """The checkpoint's state.json, with every RNG put back as it was."""
    state = json.loads((Path(ckpt_dir) / "state.json").read_text())
    set_rng_state(state["rng"])
    return state


def read_optimizer_state(ckpt_dir: Path, state: dict) -> dict | None:
    """The optimizer state dict (keyed by parameter name) saved with the checkpoint, if any."""
    if "optimizer" not in state:
        return None
    meta = state["optimizer"]
    slots: dict[str, dict] = {}
    items = list(load_file(str(Path(ckpt_dir) / "optimizer.safetensors")).items()) + list(meta["scalars"].items())
    for key, value in items:
        name, slot = key.rsplit("/", 1)
        slots.setdefault(name, {})[slot] = value
    return {"state": slots, "param_groups": meta["param_groups"]}


def incomplete(ckpt_dir: Path) -> str | None:
    """Why the checkpoint cannot be resumed from (a file missing, cut short or unreadable), or None."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
    except (OSError, ValueError):
        return "state.json is unreadable"
    files = ["model.safetensors"] + (["optimizer.safetensors"] if "optimizer" in state else [])
    for name in files:
        if not (ckpt_dir / name).is_file():
            return f"{name} is missing"
        try:
            safetensors_shapes(ckpt_dir / name)  # the header against the file's size, nothing loaded
        except UserError:
            return f"{name} is truncated or damaged"
    return None
