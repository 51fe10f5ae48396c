"""How much one optimizer step learns from: the training loop and the SFT epoch count both ask here.

A micro-batch is `train.micro_batch` rows (sequences) of `context` tokens on each of `world` processes.
`train.batch_tokens` asks for that many tokens per optimizer step, so the loop accumulates the gradients
of several micro-batches; the step then sees (TrainConfig.accumulation_steps, rows_per_step,
full_batch_tokens: the config checks its schedules with them)

    rows_per_step   = micro_batch * world * accumulation_steps   rows, and
    rows_per_step * context                                       tokens.

Two schedules, each off unless asked for, change that shape along the run. Both are pure functions of
the run's progress (steps done over the schedule's length, the measure the learning rate follows), so
every process computes the same shape and a resumed run the same as an uninterrupted one.

Sequence-length warmup (`train.seq_len_start`, `train.seq_len_warmup`): the rows start short and grow
to the context. Li et al. 2022 ("The Stability-Efficiency Dilemma", sequence length warmup) found that
short sequences early keep the first steps' gradients tame, so a larger batch and learning rate train
without loss spikes; they grow the length linearly with the steps. modded-nanogpt grows its attention
window in a few stages and sizes in whole blocks, so the compiled graph and the kernels meet few shapes.
Here the length follows the linear ramp from the shortest size to the context, rounded down to one of
few sizes: the context halved, `context >> k` (powers of two for a power-of-two context), the shortest
being the last halving not under `seq_len_start`. A micro-batch of rows of length w holds `context // w`
times as many rows, so the tokens per step (and the lr schedule's meaning and the step's cost) stay
those of the full-length step, while attention, quadratic in the length, costs less.

Batch-size warmup (`train.batch_start_tokens`, `train.batch_warmup`): the tokens per step grow linearly
from the start to the full batch, in whole rows (at least one per process). A step of more rows than a
micro-batch holds is split into equal micro-batches, so each one's mean loss weighs the same.
"""
from __future__ import annotations

from dataclasses import dataclass

from scratchlm.config import TrainConfig


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step draws on each process: `micro_batches` batches of `rows` rows of `window` tokens."""
    micro_batches: int
    rows: int
    window: int

    def tokens(self, world: int = 1) -> int:
        """Tokens the step learns from, all processes together."""
        return world * self.micro_batches * self.rows * self.window


def scheduled(train: TrainConfig) -> bool:
    """Whether either schedule is on; when neither is, every step is `train.accumulation_steps` full micro-batches."""
    return bool(train.seq_len_start or train.batch_start_tokens)


def _ramp(progress: float, fraction: float) -> float:
    """0 at the start of the run, rising linearly to 1 at `fraction` of it, 1 after."""
    return min(1.0, max(0.0, progress) / fraction)


def window_at(train: TrainConfig, context: int, progress: float) -> int:
    """Tokens per row at `progress` (0 to 1) of the run: the context, or under sequence-length warmup
    the linear ramp from the shortest size to the context rounded down to a halving of the context."""
    if not train.seq_len_start:
        return context
    shortest = context
    while shortest // 2 >= train.seq_len_start:
        shortest //= 2
    target = shortest + (context - shortest) * _ramp(progress, train.seq_len_warmup)
    window = context
    while window > target:   # stops at `shortest` at the latest: the target is never below it
        window //= 2
    return window


def batch_tokens_at(train: TrainConfig, context: int, world: int, progress: float) -> float:
    """Tokens per step the batch-size warmup asks for at `progress`, all processes together (before
    rounding to whole rows): the full batch when it is off or done."""
    full = train.full_batch_tokens(context, world)
    if not train.batch_start_tokens:
        return full
    return train.batch_start_tokens + (full - train.batch_start_tokens) * _ramp(progress, train.batch_warmup)


def step_shape(train: TrainConfig, context: int, world: int, progress: float) -> StepShape:
    """The step at `progress` of the run, on each process: with both schedules off, or once they are
    done, `train.accumulation_steps` micro-batches of `micro_batch` rows of `context` tokens."""
    window = window_at(train, context, progress)
    per_micro = train.micro_batch * (context // window)   # rows of a micro-batch: a full one's tokens
    most = train.accumulation_steps(context, world) * per_micro
    rows = min(most, max(1, int(batch_tokens_at(train, context, world, progress) // (world * window))))
    micro_batches = -(-rows // per_micro)
    return StepShape(micro_batches, rows // micro_batches, window)
