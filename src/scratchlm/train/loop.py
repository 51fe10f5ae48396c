"""The pretraining loop: one function, `pretrain`, that turns a config into a run folder.

What it guarantees: float32 master weights whatever the compute precision; a checkpoint that holds
everything needed to continue (a run killed at any moment and resumed gives the same per-step losses
as one never interrupted); a metrics row per logged step; a budget in wall-clock minutes honoured by
sizing the learning-rate schedule to the measured step time.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from scratchlm.config import RunConfig
from scratchlm.data.loader import RandomWindows
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import open_split
from scratchlm.errors import UserError
from scratchlm.eval.metrics import evaluate
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.optim import build_optimizer, lr_at

CALIBRATE_AFTER = 20      # steps timed before the schedule is sized to a time budget
MAX_BAD_STEPS = 5         # non-finite losses in a row before the run gives up


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts, or None for plain float32. Autocast computes matrix products in
    16 bits while the parameters (and so the optimizer) stay float32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise UserError(f"train.precision = {precision!r} is not one of auto, fp32, bf16, fp16")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class MetricsLog:
    """metrics.jsonl, appended one row at a time. On resume, rows past the checkpoint are dropped, so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is not None and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
            ckpt.atomic_write_text(path, "".join(r + "\n" for r in rows))
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


def _prepare_run_dir(out_dir: Path, cfg: RunConfig, tokenizer_dir: Path) -> Path | None:
    """Create the run folder; return the checkpoint to resume from, if any."""
    existing = ckpt.list_checkpoints(out_dir)
    if existing and cfg.train.resume != "auto":
        raise UserError(f"{out_dir} already holds a run; continue it with --resume or choose another --out")
    if cfg.train.resume not in ("no", "auto"):
        raise UserError(f"train.resume = {cfg.train.resume!r} is not one of no, auto")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, out_dir / "tokenizer")
    cfg.save(out_dir / "config.toml")
    return existing[-1] if existing else None


def pretrain(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train from scratch (or resume) and return the final validation metrics."""
    out_dir = Path(out_dir)
    tc = cfg.train
    device = pick_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    data = prepare(cfg.data, progress)
    tokenizer = Tokenizer.load(data.tokenizer_dir)
    cfg.model.vocab_size = tokenizer.vocab_size
    resume_from = _prepare_run_dir(out_dir, cfg, data.tokenizer_dir)

    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, tc, device)
    forward = torch.compile(model) if tc.compile else model
    autocast = autocast_for(device, tc.precision)
    scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
    context = cfg.model.context
    loader = RandomWindows(open_split(data.shard_dir, "train"), context, tc.micro_batch, tc.seed, device)
    val_shards = open_split(data.shard_dir, "val")
    token_bytes = torch.tensor(tokenizer.token_byte_lengths())
    accum = max(1, tc.batch_tokens // (tc.micro_batch * context)) if tc.batch_tokens else 1
    tokens_per_step = accum * tc.micro_batch * context

    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "total_steps": tc.max_steps, "best_val_loss": math.inf}
    if resume_from is not None:
        ckpt.load_weights(model, resume_from)
        saved = ckpt.load_training_state(resume_from, optimizer)
        loader.load_state_dict(saved["loader"])
        state.update({k: saved[k] for k in state})
        print(f"resuming {out_dir} from step {state['step']}", flush=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", state["step"] if resume_from is not None else None)

    def run_eval(max_tokens: int) -> dict:
        return evaluate(model, val_shards, token_bytes, context=context, batch=tc.micro_batch,
                        max_tokens=max_tokens, device=device, autocast=autocast)

    def save() -> None:
        ckpt.save_checkpoint(out_dir, state["step"], model, optimizer, {**state, "loader": loader.state_dict()},
                             keep=tc.keep_checkpoints)

    budget = tc.minutes * 60
    if not tc.max_steps and not budget:
        raise UserError("set train.max_steps or train.minutes (or both) so the run knows when to stop")
    start_step, calibrate_from = state["step"], None
    bar = tqdm(total=state["total_steps"] or None, initial=state["step"], desc="pretrain", unit="step",
               disable=not progress, dynamic_ncols=True)
    bad_steps, window_tokens, window_time = 0, 0, 0.0
    model.train()
    with StopFlag() as stop:
        while True:
            total = state["total_steps"]
            if (total and state["step"] >= total) or (budget and state["train_seconds"] >= 1.1 * budget) or stop.raised:
                break
            t0 = time.perf_counter()
            lr = lr_at(state["step"], total or 10**9, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                x, y = loader.next_batch()
                with autocast() if autocast else contextlib.nullcontext():
                    logits = forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            loss_value, norm_value = loss_sum.item(), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
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

            if budget and not tc.max_steps and not state["total_steps"]:
                # Size the schedule to the budget from the measured step time (the first steps are
                # slower while allocators and caches warm up, so they are left out).
                if step == start_step + 3:
                    calibrate_from = (step, state["train_seconds"])
                elif calibrate_from and step == start_step + CALIBRATE_AFTER:
                    per_step = (state["train_seconds"] - calibrate_from[1]) / (step - calibrate_from[0])
                    state["total_steps"] = step + max(1, int((budget - state["train_seconds"]) / per_step))
                    bar.total = state["total_steps"]

            if step % tc.log_every == 0 or step == state["total_steps"]:
                rate = window_tokens / max(window_time, 1e-9)
                metrics.write({"step": step, "tokens": state["tokens"], "loss": loss_value, "lr": lr,
                               "grad_norm": norm_value, "tokens_per_s": rate, "seconds": state["train_seconds"]})
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}", refresh=False)
                window_tokens, window_time = 0, 0.0
            bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0:
                row = run_eval(tc.eval_tokens)
                metrics.write({"step": step, "tokens": state["tokens"], **row})
                tqdm.write(f"step {step}: val loss {row['val_loss']:.4f}, val bpb {row['val_bpb']:.4f}")
                state["best_val_loss"] = min(state["best_val_loss"], row["val_loss"])
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save()
        bar.close()
        save()
        if stop.raised:
            metrics.close()
            print(f"stopped at step {state['step']}; checkpoint saved in {out_dir}. Continue with --resume.")
            return {"interrupted": True, "step": state["step"]}

    final = run_eval(0)
    metrics.write({"step": state["step"], "tokens": state["tokens"], "final": True, **final})
    metrics.close()
    from scratchlm.viz.plots import plot_runs

    plot_runs([out_dir], out_dir / "loss.png")
    return {"step": state["step"], "tokens": state["tokens"], "train_seconds": state["train_seconds"], **final}
