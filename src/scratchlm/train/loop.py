"""The training engine. `fit` trains any model on any batch source into a run folder; the stages that
call it (train/pretrain.py on token windows of a corpus, sft/train.py on chat examples) say what to
train on and how to score it.

What it guarantees: float32 master weights whatever the compute precision; a checkpoint that holds
everything needed to continue (a run killed at any moment and resumed gives the same per-step losses
as one never interrupted); a metrics row per logged step; a budget in wall-clock minutes honoured by
sizing the learning-rate schedule to the measured step time (train/budget.py); the same code under
`torchrun`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from scratchlm.config import RunConfig
from scratchlm.errors import UserError
from scratchlm.loading import load_weights
from scratchlm.model.info import flops_per_token
from scratchlm.model.transformer import Transformer
from scratchlm.runtime import autocast_for, compute_dtype, eval_mode, pick_device
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import distributed as dist
from scratchlm.train.accumulation import StepShape, scheduled, step_shape
from scratchlm.train.budget import UNSIZED, Budget
from scratchlm.train.mfu import Throughput, peak_flops
from scratchlm.train.optim import build_optimizer, lr_at, set_lr
from scratchlm.train.runfolder import RunLog, open_run

MAX_BAD_STEPS = 5         # non-finite losses in a row before the run gives up


@dataclass
class TrainJob:
    """What `fit` trains, besides the config: the model (on the CPU, not yet wrapped), its tokenizer and
    the folder it was saved in, a batch source with `next_batch()`, `state_dict()` and
    `load_state_dict()`, and a validation function `evaluate(model, max_tokens) -> {"val_loss": ...,
    "val_bpb": ...}` (max_tokens 0: all of it)."""
    model: Transformer
    tokenizer: Tokenizer
    tokenizer_dir: Path
    batches: object
    evaluate: Callable[[torch.nn.Module, int], dict]
    sample_prompt: list[int] | None = None


class Interrupted(KeyboardInterrupt):
    """A second signal during training: stop at once, without the checkpoint, exiting as that signal asks."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopFlag:
    """SIGTERM and Ctrl-C ask the loop to stop at the end of the current step, after a checkpoint; `signal`
    is the one received (0: none)."""

    def __init__(self):
        self.signal = 0
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal:  # a second one means now
            raise Interrupted(signum)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Stepper:
    """What one optimizer step needs, put together once by `fit`."""
    model: torch.nn.Module         # the parameters (FSDP shards them in place)
    wrapped: torch.nn.Module       # what runs forward and backward: the model, DDP around it, or compiled
    loss_of: Callable              # (x, y) -> mean loss, through `wrapped`
    optimizer: object
    accum: int                     # micro-batches per step
    grad_clip: float               # 0: no clipping
    clip_grad_norm: Callable
    autocast: Callable | None
    scaler: torch.amp.GradScaler | None


def train_step(s: Stepper, batches, d: dist.Dist, shape: StepShape | None = None) -> tuple[float, float, bool]:
    """One optimizer step: the gradients of `s.accum` micro-batches (or those of `shape`, drawn in its
    shape) summed (the processes' averaged on the last), unscaled, clipped, and applied unless the loss
    or the gradient norm is not finite, in which case they are dropped. Returns (loss, gradient norm,
    applied)."""
    loss_sum, accum = 0.0, shape.micro_batches if shape else s.accum
    for micro in range(accum):
        x, y = batches.next_batch(shape.rows, shape.window) if shape else batches.next_batch()
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not hasattr(s.wrapped, "no_sync") else s.wrapped.no_sync():
            with s.autocast() if s.autocast else contextlib.nullcontext():
                loss = s.loss_of(x, y) / accum
            (s.scaler.scale(loss) if s.scaler else loss).backward()
        loss_sum = loss_sum + loss.detach()
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    norm = s.clip_grad_norm(s.model.parameters(), s.grad_clip if s.grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a sharded scalar
        norm = norm.full_tensor()
    loss_value, norm_value = dist.mean_across(loss_sum, d).item(), float(norm)
    ok = math.isfinite(loss_value) and math.isfinite(norm_value)
    if ok and s.scaler:
        s.scaler.step(s.optimizer)
    elif ok:
        s.optimizer.step()
    if s.scaler:
        s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, ok


def require_kernel(cfg: RunConfig, device: torch.device) -> None:
    """Refuse, before anything is prepared, a run that asks for the Triton kernel where it cannot run.
    (Inference falls back to SDPA instead; training asked for the kernel, so it must have it.)"""
    if cfg.model.attention == "triton":  # the module imports triton: only when asked for
        from scratchlm.model.flash_triton import require_usable

        require_usable(cfg.model, device)


def fit(cfg: RunConfig, out_dir: str | Path, job: TrainJob, progress: bool = True, d: dist.Dist | None = None) -> dict:
    """Train `job.model` under `cfg.train` into `out_dir`, resuming the run there when asked. Returns the
    final validation metrics, or {"interrupted": True, "signal": N, "step": ...} when a signal stopped
    the run (after a checkpoint). The caller holds the run folder's lock (train/lock.py)."""
    out_dir, tc = Path(out_dir), cfg.train
    d = d or dist.Dist()
    device = pick_device(tc.device, "train.device")
    require_kernel(cfg, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    budget = Budget(tc.minutes * 60, tc.max_steps)
    reshaping = _batch_schedules(cfg, job.batches, d)
    resume_from = open_run(out_dir, cfg, job.tokenizer_dir, d)
    if resume_from is not None:
        load_weights(job.model, resume_from)
    s = _stepper(cfg, job.model, device, d)
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "best_val_loss": math.inf, "best_step": None}
    if resume_from is not None:
        _restore(resume_from, state, s, job.batches)
        if d.main:
            print(f"resuming {out_dir} from step {state['step']}", flush=True)
    flops_at = functools.cache(lambda window: flops_per_token(cfg.model, window))   # builds a model on meta: once a size
    throughput = Throughput(flops_at(cfg.model.context), peak_flops(device, compute_dtype(device, tc.precision)), d.world)
    saved_at = state["step"] if resume_from is not None else None

    def save() -> None:
        nonlocal saved_at
        weights, optimizer_state = dist.full_model_state(s.model), dist.full_optimizer_state(s.model, s.optimizer)
        if d.main:
            ckpt.save_checkpoint(out_dir, state["step"], weights, optimizer_state,
                                 {**state, "loader": job.batches.state_dict()}, keep=tc.keep_checkpoints,
                                 protect=state["best_step"])
        dist.barrier(d)
        saved_at = state["step"]

    bar = tqdm(total=tc.max_steps or None, initial=state["step"], desc="train", unit="step",
               disable=not (progress and d.main), dynamic_ncols=True)
    bad_steps = 0
    s.wrapped.train()
    with RunLog(out_dir, cfg, state["step"] if resume_from is not None else None, d.main) as log:
        with StopFlag() as stop:
            while True:
                # every process takes the same decisions, from the same clock, or the next collective hangs
                state["train_seconds"], stopped = dist.max_across((state["train_seconds"], stop.signal), d)
                if stopped or budget.done(state["step"], state["train_seconds"]):
                    break
                total = budget.total_steps(state["step"], state["train_seconds"])
                lr = lr_at(state["step"], total, tc)
                set_lr(s.optimizer, lr)
                # the tokens counted are those drawn: with the schedules off, the full batch every step
                shape = step_shape(tc, cfg.model.context, d.world, budget.progress(state["step"], state["train_seconds"]))
                tokens = shape.tokens(d.world)
                t0 = time.perf_counter()
                loss, norm, ok = train_step(s, job.batches, d, shape if reshaping else None)
                dt = time.perf_counter() - t0
                bad_steps = 0 if ok else bad_steps + 1
                if not ok:
                    _skipped(state["step"], loss, norm, bad_steps, out_dir, d)
                state["step"] += 1
                state["tokens"] += tokens
                state["train_seconds"] += dt
                throughput.add(tokens, dt, flops_at(shape.window))
                step = state["step"]
                bar.total = None if total >= UNSIZED else max(step, round(total))
                bar.update(1)

                if step % tc.log_every == 0 or budget.done(step, state["train_seconds"]):   # and the last step
                    _log_step(log, bar, {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                                         "window": shape.window, "batch_tokens": tokens}, state, throughput)
                if tc.eval_every and step % tc.eval_every == 0:
                    row = _evaluate(job, s, step, tc.eval_tokens, d, sample=not (d.active and tc.parallel == "fsdp"))
                    log.write({"step": step, "tokens": state["tokens"], **row})
                    if row["val_loss"] < state["best_val_loss"]:
                        state["best_val_loss"], state["best_step"] = row["val_loss"], step
                        if tc.keep_best and not (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                            save()
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    save()
            bar.close()
            if saved_at != state["step"]:
                save()
        if stopped:
            if d.main:
                print(f"stopped at step {state['step']}; checkpoint saved in {out_dir}. Continue with --resume.")
            return {"interrupted": True, "signal": int(stopped), "step": state["step"]}
        final = job.evaluate(s.wrapped, 0)
        log.write({"step": state["step"], "tokens": state["tokens"], "final": True, **final})
    return {"step": state["step"], "tokens": state["tokens"], "train_seconds": state["train_seconds"], **final}


def _stepper(cfg: RunConfig, model: Transformer, device: torch.device, d: dist.Dist) -> Stepper:
    """The model on its device, wrapped for the processes, and what a step runs it with."""
    tc = cfg.train
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
    if tc.implementation == "reference":
        from scratchlm.train.reference import clip_grad_norm, cross_entropy

        def loss_of(x, y):
            return cross_entropy(forward(x).float().flatten(0, 1), y.flatten())
    else:
        clip_grad_norm = torch.nn.utils.clip_grad_norm_

        def loss_of(x, y):  # the model's own loss, fused with its output head
            return forward(x, targets=y)

    return Stepper(model, wrapped, loss_of, optimizer, tc.accumulation_steps(cfg.model.context, d.world),
                   tc.grad_clip, clip_grad_norm, autocast_for(device, tc.precision),
                   torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None)


def _batch_schedules(cfg: RunConfig, batches, d: dist.Dist) -> bool:
    """Whether the steps change shape along the run (train/accumulation.py): checked against the full
    batch on this many processes, and refused for a batch source that draws one shape only (SFT's
    packed examples, which a shorter row would cut)."""
    if not scheduled(cfg.train):
        return False
    if not getattr(batches, "reshapes", False):
        raise UserError("train.seq_len_start and train.batch_start_tokens apply to pretraining only; "
                        "set them to 0 for this stage (sft.train.seq_len_start=0, sft.train.batch_start_tokens=0)")
    cfg.train.check_batch_schedules(cfg.model.context, d.world)
    return True


def _restore(resume_from: Path, state: dict, s: Stepper, batches) -> None:
    """Optimizer, data position, counters and random generators as the checkpoint left them."""
    saved = ckpt.load_training_state(resume_from)
    optimizer_state = ckpt.read_optimizer_state(resume_from, saved)
    if optimizer_state is not None:
        dist.load_optimizer_state(s.model, s.optimizer, optimizer_state)
    batches.load_state_dict(saved["loader"])
    state.update({k: saved[k] for k in state if k in saved})


def _log_step(log: RunLog, bar: tqdm, row: dict, state: dict, throughput: Throughput) -> None:
    rate = throughput.read()
    log.write({"step": row["step"], "tokens": state["tokens"], **row, **rate, "seconds": state["train_seconds"]})
    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{rate['tokens_per_s']:,.0f}",
                    **({"mfu": f"{100 * rate['mfu']:.0f}%"} if "mfu" in rate else {}), refresh=False)


def _skipped(step: int, loss: float, norm: float, bad_steps: int, out_dir: Path, d: dist.Dist) -> None:
    if d.main:
        tqdm.write(f"step {step}: loss {loss}, grad norm {norm}: step skipped")
    if bad_steps >= MAX_BAD_STEPS:
        raise UserError(f"{bad_steps} non-finite losses in a row at step {step}; lower train.lr. "
                        f"The last good checkpoint is in {out_dir}/checkpoints")


def _evaluate(job: TrainJob, s: Stepper, step: int, max_tokens: int, d: dist.Dist, sample: bool) -> dict:
    """The periodic validation row, with a short sample from the first process (FSDP's shards cannot
    generate on one process alone), said on the console."""
    row = job.evaluate(s.wrapped, max_tokens)
    if d.main and job.sample_prompt and sample:
        from scratchlm.infer.generate import generate
        from scratchlm.infer.sampling import SAMPLING

        with eval_mode(s.model):
            ids = generate(s.model, job.sample_prompt, SAMPLING["train_sample"])
        row["sample"] = job.tokenizer.decode(job.sample_prompt + ids)
    if d.main:
        tqdm.write(f"step {step}: val loss {row['val_loss']:.4f}, val bpb {row['val_bpb']:.4f}")
        if "sample" in row:
            tqdm.write("  sample: " + row["sample"].replace("\n", "\n  "))
    return row
