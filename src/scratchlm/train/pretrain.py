"""`scratchlm pretrain`: a model trained from scratch on the `[data]` corpus.

The stage prepares the tokenizer and token shards (cached), builds the model from `[model]`, and hands
`fit` random windows of the training split to learn from and the validation split to score on. It holds
the run folder's lock while it writes there, and draws loss.png when the run is done.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from scratchlm.config import RunConfig
from scratchlm.data.loader import RandomWindows
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import open_split
from scratchlm.eval.metrics import evaluate
from scratchlm.model.transformer import Transformer
from scratchlm.runtime import autocast_for, pick_device
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import distributed as dist
from scratchlm.train.lock import RunLock
from scratchlm.train.loop import TrainJob, fit, require_kernel


def pretrain(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train from scratch (or resume) on the `[data]` corpus and return the final validation metrics
    (or, when a signal stopped the run, {"interrupted": True, "signal": N, "step": ...})."""
    out_dir = Path(out_dir)
    device = pick_device(cfg.train.device, "train.device")
    require_kernel(cfg, device)
    d = dist.init_distributed(device.type)
    try:
        with RunLock(out_dir) if d.main else contextlib.nullcontext():
            result = fit(cfg, out_dir, _job(cfg, device, progress, d), progress, d)
            if d.main and not result.get("interrupted"):
                from scratchlm.viz.plots import plot_runs

                plot_runs([out_dir], out_dir / "loss.png")
        return result
    finally:
        dist.close_distributed()


def _job(cfg: RunConfig, device: torch.device, progress: bool, d: dist.Dist) -> TrainJob:
    # One process builds the cached tokenizer and shards; the others then find them ready.
    if not d.main:
        dist.barrier(d)
    data = prepare(cfg.data, progress and d.main)
    if d.main:
        dist.barrier(d)
    tokenizer = Tokenizer.load(data.tokenizer_dir)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    context, tc = cfg.model.context, cfg.train
    batches = RandomWindows(open_split(data.shard_dir, "train"), context, tc.micro_batch, tc.seed,
                            device, d.rank, d.world)
    val_shards = open_split(data.shard_dir, "val")
    token_bytes = torch.tensor(tokenizer.token_byte_lengths())
    autocast = autocast_for(device, tc.precision)

    def run_eval(m: torch.nn.Module, max_tokens: int) -> dict:
        return evaluate(m, val_shards, token_bytes, context=context, batch=tc.micro_batch,
                        max_tokens=max_tokens, device=device, autocast=autocast)

    prompt = [int(t) for t in val_shards[0][:8]] if val_shards else None
    return TrainJob(model, tokenizer, data.tokenizer_dir, batches, run_eval, prompt)
