"""The training loop. `fit` trains any model on any batch source into a run folder; `pretrain` feeds it
token windows from a corpus (and `scratchlm sft` feeds it chat examples).

What it guarantees: float32 master weights whatever the compute precision; a checkpoint that holds
everything needed to continue (a run killed at any moment and resumed gives the same per-step losses
as one never interrupted); a metrics row per logged step; a budget in wall-clock minutes honoured by
sizing the learning-rate schedule to the measured step time; the same code under `torchrun`.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from scratchlm.config import RunConfig
from scratchlm.data.loader import RandomWindows
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import open_split
from scratchlm.errors import UserError
from scratchlm.eval.metrics import evaluate
from scratchlm.loading import load_weights
from scratchlm.model.info import flops_per_token
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import distributed as dist
from scratchlm.files import atomic_write_text
from scratchlm.rundir import list_checkpoints
from scratchlm.runtime import autocast_for, compute_dtype, pick_device
from scratchlm.train.loggers import Sinks
from scratchlm.train.mfu import peak_flops
from scratchlm.train.optim import build_optimizer, lr_at, set_lr

CALIBRATE_AFTER = 20      # steps timed before the schedule is sized to a time budget
MAX_BAD_STEPS = 5         # non-finite losses in a row before the run gives up


class MetricsLog:
    """metrics.jsonl, appended one row at a time. On resume, rows past the checkpoint are dropped, so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is not None and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
            atomic_write_text(path, "".join(r + "\n" for r in rows))
        elif keep_through_step is None and path.exists():
            path.unlink()
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class StopFlag:
    """SIGTERM and Ctrl-C ask the loop to stop at the end of the current step, after a checkpoint."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Job:
    """What `fit` trains, besides the config: the model (on the CPU, not yet wrapped), its tokenizer, a
    batch source with `next_batch()`, `state_dict()` and `load_state_dict()`, and a validation function
    `evaluate(model, max_tokens) -> {"val_loss": ..., "val_bpb": ...}` (max_tokens 0: all of it)."""
    model: Transformer
    tokenizer: Tokenizer
    tokenizer_dir: Path
    batches: object
    evaluate: Callable[[torch.nn.Module, int], dict]
    sample_prompt: list[int] | None = None


def _prepare_run_dir(out_dir: Path, cfg: RunConfig, tokenizer_dir: Path) -> Path | None:
    """Create the run folder; return the checkpoint to resume from, if any."""
    existing = list_checkpoints(out_dir)
    if existing and cfg.train.resume != "auto":
        raise UserError(f"{out_dir} already holds a run; continue it with --resume or choose another --out")
    if cfg.train.resume not in ("no", "auto"):
        raise UserError(f"train.resume = {cfg.train.resume!r} is not one of no, auto")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer").exists():
        tmp = out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tmp)
        tmp.rename(out_dir / "tokenizer")
    cfg.save(out_dir / "config.toml")
    return existing[-1] if existing else None


def pretrain(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train from scratch (or resume) on the `[data]` corpus and return the final validation metrics."""
    device = pick_device(cfg.train.device)
    d = dist.init_distributed(device.type)
    try:
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
        return fit(cfg, out_dir, Job(model, tokenizer, data.tokenizer_dir, batches, run_eval, prompt), progress, d)
    finally:
        dist.close_distributed()


def _sample(model: Transformer, tokenizer: Tokenizer, prompt: list[int]) -> str:
    from scratchlm.infer.generate import SamplingParams, generate

    was_training = model.training
    model.eval()
    ids = generate(model, prompt, SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, seed=0))
    model.train(was_training)
    return tokenizer.decode(prompt + ids)


def fit(cfg: RunConfig, out_dir: str | Path, job: Job, progress: bool = True, d: dist.Dist | None = None) -> dict:
    """Train `job.model` under `cfg.train` into `out_dir`, resuming the run there when asked."""
    out_dir, tc = Path(out_dir), cfg.train
    d = d or dist.Dist()
    device = pick_device(tc.device)
    if cfg.model.attention == "triton":  # inference falls back to SDPA; training asked for the kernel: it must run
        from scratchlm.model.flash_triton import require_usable
        require_usable(cfg.model, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    progress = progress and d.main
    resume_from = None
    if d.main:
        resume_from = _prepare_run_dir(out_dir, cfg, job.tokenizer_dir)
    dist.barrier(d)
    if not d.main:
        resume_from = (list_checkpoints(out_dir) or [None])[-1]

    model = job.model
    if resume_from is not None:
        load_weights(model, resume_from)
    model.to(device)
    if tc.activation_checkpointing:
        from torch.distributed._composable import checkpoint as recompute

        for block in model.blocks:  # keeps parameter names; each block's activations are recomputed in backward
            recompute(block)
    if tc.parallel == "fsdp" and tc.optimizer == "muon" and d.active:
        raise UserError("train.optimizer = 'muon' does not run on FSDP-sharded weights; use train.parallel=ddp")
    wrapped = dist.wrap(model, tc.parallel, d, device)
    optimizer = build_optimizer(model, tc, device)
    forward = torch.compile(wrapped) if tc.compile else wrapped
    autocast = autocast_for(device, tc.precision)
    scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
    context = cfg.model.context
    rows_per_step = tc.micro_batch * context * d.world
    accum = max(1, tc.batch_tokens // rows_per_step) if tc.batch_tokens else 1
    tokens_per_step = accum * rows_per_step
    flops_token, peak = flops_per_token(cfg.model), peak_flops(device, compute_dtype(device, tc.precision))
    if tc.implementation == "reference":
        from scratchlm.train.reference import clip_grad_norm, cross_entropy

        def loss_of(x, y):
            return cross_entropy(forward(x).float().flatten(0, 1), y.flatten())
    else:
        clip_grad_norm = torch.nn.utils.clip_grad_norm_

        def loss_of(x, y):  # the model's own loss, fused with its output head
            return forward(x, targets=y)

    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "total_steps": tc.max_steps,
             "best_val_loss": math.inf, "best_step": None}
    if resume_from is not None:
        saved = ckpt.load_training_state(resume_from)
        optimizer_state = ckpt.read_optimizer_state(resume_from, saved)
        if optimizer_state is not None:
            dist.load_optimizer_state(model, optimizer, optimizer_state)
        job.batches.load_state_dict(saved["loader"])
        state.update({k: saved[k] for k in state if k in saved})
        if tc.max_steps:  # a step budget given now wins, so a finished run can be extended
            state["total_steps"] = tc.max_steps
        if d.main:
            print(f"resuming {out_dir} from step {state['step']}", flush=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", state["step"] if resume_from is not None else None) if d.main else None
    sinks = Sinks(tc.log_to, out_dir, cfg.to_dict(), resume_from is not None) if d.main else None

    def log(row: dict) -> None:
        if metrics:
            metrics.write(row)
            sinks.write(row)

    def save() -> None:
        weights = dist.full_model_state(model)
        optimizer_state = dist.full_optimizer_state(model, optimizer)
        if d.main:
            ckpt.save_checkpoint(out_dir, state["step"], weights, optimizer_state,
                                 {**state, "loader": job.batches.state_dict()}, keep=tc.keep_checkpoints,
                                 protect=state["best_step"])
        dist.barrier(d)

    budget = tc.minutes * 60
    if not tc.max_steps and not budget:
        raise UserError("set train.max_steps or train.minutes (or both) so the run knows when to stop")
    start_step, calibrate_from = state["step"], None
    resize_at = math.inf
    bar = tqdm(total=state["total_steps"] or None, initial=state["step"], desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    bad_steps, window_tokens, window_time = 0, 0, 0.0
    wrapped.train()
    with StopFlag() as stop:
        while True:
            total = state["total_steps"]
            done = (total and state["step"] >= total) or (budget and state["train_seconds"] >= 1.1 * budget)
            if d.active:  # every process must take the same decision, or the next collective hangs
                done = dist.any_across(bool(done) or stop.raised, d)
            if done or stop.raised:
                break
            t0 = time.perf_counter()
            lr = lr_at(state["step"], total or 10**9, tc)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = job.batches.next_batch()
                sync = micro == accum - 1 or not hasattr(wrapped, "no_sync")
                with contextlib.nullcontext() if sync else wrapped.no_sync():
                    with autocast() if autocast else contextlib.nullcontext():
                        loss = loss_of(x, y) / accum
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded scalar
                grad_norm = grad_norm.full_tensor()
            loss_value, norm_value = dist.mean_across(loss_sum, d).item(), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()
                bad_steps += 1
                if d.main:
                    tqdm.write(f"step {state['step']}: loss {loss_value}, grad norm {norm_value}: step skipped")
                if bad_steps >= MAX_BAD_STEPS:
                    raise UserError(f"{bad_steps} non-finite losses in a row at step {state['step']}; lower train.lr. "
                                    f"The last good checkpoint is in {out_dir}/checkpoints")
            else:
                bad_steps = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += tokens_per_step
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            window_tokens += tokens_per_step
            window_time += dt
            step = state["step"]

            if budget and not tc.max_steps and calibrate_from:
                # Size the schedule to the time left from the step time measured since the last sizing, and
                # size it again each time another 5% of the budget has passed, so that a machine that gets
                # busier or quieter still ends the run on its budget with the schedule run through.
                due = step == start_step + CALIBRATE_AFTER or (
                    step > start_step + CALIBRATE_AFTER and state["train_seconds"] >= resize_at)
                if d.active:  # every process must resize at the same step: the next collective needs it
                    due = dist.any_across(due, d)
                if due:
                    per_step = (state["train_seconds"] - calibrate_from[1]) / (step - calibrate_from[0])
                    per_step = dist.mean_across(torch.tensor(per_step, dtype=torch.float64), d).item()
                    state["total_steps"] = step + max(1, int((budget - state["train_seconds"]) / per_step))
                    bar.total = state["total_steps"]
                    calibrate_from, resize_at = (step, state["train_seconds"]), state["train_seconds"] + budget / 20
            if budget and not tc.max_steps and step == start_step + 3:
                # the first steps are slower while allocators and caches warm up, so they are left out
                calibrate_from = (step, state["train_seconds"])

            if step % tc.log_every == 0 or step == state["total_steps"]:
                rate = window_tokens / max(window_time, 1e-9)
                mfu = flops_token * rate / d.world / peak if peak else None
                row = {"step": step, "tokens": state["tokens"], "loss": loss_value, "lr": lr,
                       "grad_norm": norm_value, "tokens_per_s": rate, "seconds": state["train_seconds"]}
                log(row | ({"mfu": mfu} if mfu is not None else {}))
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}",
                                **({"mfu": f"{100 * mfu:.0f}%"} if mfu is not None else {}), refresh=False)
                window_tokens, window_time = 0, 0.0
            bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0:
                row = job.evaluate(wrapped, tc.eval_tokens)
                if d.main and job.sample_prompt and not (d.active and tc.parallel == "fsdp"):
                    row["sample"] = _sample(model, job.tokenizer, job.sample_prompt)
                log({"step": step, "tokens": state["tokens"], **row})
                if d.main:
                    tqdm.write(f"step {step}: val loss {row['val_loss']:.4f}, val bpb {row['val_bpb']:.4f}")
                    if "sample" in row:
                        tqdm.write("  sample: " + row["sample"].replace("\n", "\n  "))
                if row["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"], state["best_step"] = row["val_loss"], step
                    if tc.keep_best and not (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                        save()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save()
        bar.close()
        save()
        if stop.raised:
            if metrics:
                metrics.close()
                sinks.close()
            if d.main:
                print(f"stopped at step {state['step']}; checkpoint saved in {out_dir}. Continue with --resume.")
            return {"interrupted": True, "step": state["step"]}

    final = job.evaluate(wrapped, 0)
    log({"step": state["step"], "tokens": state["tokens"], "final": True, **final})
    if metrics:
        metrics.close()
        sinks.close()
        from scratchlm.viz.plots import plot_runs

        plot_runs([out_dir], out_dir / "loss.png")
    return {"step": state["step"], "tokens": state["tokens"], "train_seconds": state["train_seconds"], **final}
