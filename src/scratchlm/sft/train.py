"""`scratchlm sft`: a base model fine-tuned on chat examples into a chat model.

The base run (or converted model) named by `sft.init` gives the weights and the tokenizer; the chat
tokens are added if it lacks them (the embeddings grow to match); the `[sft]` sources become batches whose
loss falls on the assistant's tokens only; and the pretraining loop, `fit`, trains on them, so resuming,
checkpoints, metrics.jsonl, loss.png and torchrun work as they do for pretraining. The run folder is an
ordinary one: `scratchlm.load`, `generate`, `chat` and `serve` read it. Last, the held-out conversations
are answered greedily and scored (see heldout.py).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch

from scratchlm.chat.template import add_chat_tokens, render_prompt
from scratchlm.config import RunConfig, load_config
from scratchlm.errors import UserError
from scratchlm.model.transformer import Transformer
from scratchlm.sft import heldout
from scratchlm.sft.data import prepare_sft, sft_evaluator
from scratchlm.sft.settings import load_persona, mixture, steps_for_epochs
from scratchlm.tokenizer import Tokenizer
from scratchlm.rundir import list_checkpoints
from scratchlm.runtime import autocast_for, pick_device
from scratchlm.train import distributed as dist
from scratchlm.train.lock import RunLock
from scratchlm.train.loop import TrainJob, fit


def stage_config(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with `[sft.train]` applied over `[train]`: the settings this stage trains with.
    The batch schedules of pretraining are not inherited (SFT's rows are whole packed examples); set in
    `[sft.train]` itself, they are refused where training starts."""
    cfg = copy.deepcopy(cfg)
    pretraining_only = {"seq_len_start": 0, "batch_start_tokens": 0}
    cfg.train = dataclasses.replace(cfg.train, **{**pretraining_only, **cfg.sft.train})
    return cfg


def _base_model(cfg: RunConfig, out_dir: Path, verbose: bool = True) -> tuple[Transformer, Tokenizer, bool]:
    """The model to train, on the CPU, with a tokenizer that has the chat tokens, and whether the run in
    `out_dir` is being resumed. A resumed run is rebuilt from its own folder (fit then loads its
    checkpoint), so it does not depend on the base run still being as it was."""
    resuming = cfg.train.resume == "auto" and bool(list_checkpoints(out_dir))
    if resuming:
        model_cfg = load_config(out_dir / "config.toml").model
        return Transformer(model_cfg), Tokenizer.load(out_dir / "tokenizer"), True
    init = cfg.sft.init
    if not init:
        raise UserError("set sft.init to the base model to fine-tune: a run folder (scratchlm pretrain) or a "
                        "folder from `scratchlm convert MODEL DIR --to scratchlm`")
    if not Path(init).exists():
        raise UserError(f"sft.init: {init} not found; pretrain it first, or point sft.init at a run folder")
    from scratchlm.loading import load

    base = load(init, "cpu")
    tokenizer, added = add_chat_tokens(base.tokenizer, base.model)
    if added and verbose:
        print(f"added the chat tokens {' '.join(added)} to the tokenizer ({tokenizer.vocab_size} tokens)", flush=True)
    return base.model.train(), tokenizer, False


def finetune(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Fine-tune `sft.init` on the `[sft]` mixture into `out_dir` (or resume the run there) and return
    the final metrics: validation loss on the held-out answers and, from greedy answers to the held-out
    conversations, exact match, F1 and ROUGE-L (percentages). Under torchrun, processes other than
    rank 0 return {}. A run stopped by a signal returns {"interrupted": True, "signal": N, "step": ...}."""
    cfg, out_dir = stage_config(cfg), Path(out_dir)
    device = pick_device(cfg.train.device, "train.device")
    d = dist.init_distributed(device.type)
    with RunLock(out_dir) if d.main else contextlib.nullcontext():
        try:
            result, held_out = _train(cfg, out_dir, device, progress, d)
        finally:
            dist.close_distributed()
        if not d.main:
            return {}   # rank 0 alone scores the answers and reports
        if result.get("interrupted"):
            return result
        from scratchlm.viz.plots import plot_runs

        plot_runs([out_dir], out_dir / "loss.png")
        if cfg.sft.eval_examples and held_out:
            from scratchlm.loading import load

            scores, details = heldout.score_held_out(load(out_dir, device), held_out, cfg.sft.eval_examples,
                                                     cfg.sft.eval_max_new_tokens, cfg.train.micro_batch)
            heldout.record(out_dir, scores, details)
            result.update(scores)
        return result


def _train(cfg: RunConfig, out_dir: Path, device: torch.device, progress: bool,
           d: dist.Dist) -> tuple[dict, list[list[dict]]]:
    """`fit` on the `[sft]` mixture: its result, and the held-out conversations."""
    tc = cfg.train
    with tempfile.TemporaryDirectory(prefix="scratchlm-sft-") as scratch:
        model, tokenizer, resuming = _base_model(cfg, out_dir, d.main)
        cfg.model = model.config
        persona = load_persona(cfg.sft)
        sources = mixture(cfg.sft, persona)
        context = cfg.model.context
        # One process downloads the named datasets into the cache; the others then read them there.
        if not d.main:
            dist.barrier(d)
        data = prepare_sft(tokenizer, sources, context=context, batch=tc.micro_batch, seed=tc.seed,
                           persona=persona, val_fraction=cfg.sft.val_fraction, pack=cfg.sft.pack, device=device,
                           drop_repeats=cfg.sft.drop_repeats,
                           rank=d.rank, world=d.world, progress=progress and d.main)
        if d.main:
            dist.barrier(d)
            _describe(data)
        if cfg.sft.epochs:
            if cfg.sft.train.get("max_steps"):
                raise UserError("set sft.epochs or sft.train.max_steps, not both")
            tc.max_steps = steps_for_epochs(cfg.sft.epochs, data.batches, tc, d.world)
        if not data.val:
            tc.eval_every = 0   # nothing held out: fit's periodic evaluation would have nothing to score
            if d.main:
                print("no held-out examples (every source is too small to split): validation is off")
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        scorer = sft_evaluator(data.val, torch.tensor(tokenizer.token_byte_lengths()), context, tc.micro_batch,
                               pad, device, autocast_for(device, tc.precision))

        def evaluate(m: torch.nn.Module, max_tokens: int) -> dict:
            return scorer(m, max_tokens) if data.val else {}

        tokenizer_dir = out_dir / "tokenizer"
        if not resuming:
            tokenizer_dir = Path(scratch) / "tokenizer"
            tokenizer.save(tokenizer_dir)
        job = TrainJob(model, tokenizer, tokenizer_dir, data.batches, evaluate,
                       _sample_prompt(tokenizer, data.val_chats, context))
        return fit(cfg, out_dir, job, progress, d), data.val_chats


def _sample_prompt(tokenizer: Tokenizer, conversations: list[list[dict]], context: int) -> list[int] | None:
    """What the periodic evaluations reply to (the loop samples 48 tokens): the first held-out
    conversation up to its first assistant message."""
    if not conversations:
        return None
    conv = conversations[0]
    first_reply = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), len(conv))
    return render_prompt(tokenizer, conv[:first_reply])[-max(1, context - 48):]


def _describe(data) -> None:
    for name, weight, n_train, n_val, repeats in data.sources:
        dropped = f" ({repeats:,} more left out: training asks the same)" if repeats else ""
        print(f"  {name} x{weight:g}: {n_train:,} training examples, {n_val:,} held out{dropped}", flush=True)
    s = data.stats
    if s.split or s.truncated or s.dropped:
        print(f"  {s.split} long conversations split, {s.truncated} examples truncated, {s.dropped} dropped")


def summary(result: dict, out_dir: Path) -> str:
    """One line on how the run ended, for the command line."""
    if result.get("interrupted") or "step" not in result:
        return ""   # the loop has said where it stopped; or another process than rank 0 is reporting
    parts = [f"step {result['step']}"]
    if "val_loss" in result:
        parts.append(f"held-out answer loss {result['val_loss']:.4f}")
    if "exact_match" in result:
        n = result["heldout_examples"]
        parts.append(f"greedy answers to {n} held-out prompt{'s' * (n != 1)}: exact match "
                     f"{result['exact_match']:.1f}%, F1 {result['f1']:.1f}%"
                     + (f", ROUGE-L {result['rouge_l']:.1f}%" if "rouge_l" in result else ""))
    return "; ".join(parts) + f"; run folder {out_dir}"
