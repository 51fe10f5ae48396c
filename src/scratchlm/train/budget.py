"""When a run stops, and how many steps its learning-rate schedule spans.

A step budget (`train.max_steps`) is the schedule's length. A time budget (`train.minutes`) alone leaves
the length to be found: the schedule is re-sized at every step to the mean step time measured so far,

    total steps = steps done + seconds left / (seconds spent / steps done) = steps done * budget / seconds spent,

so after the warmup the schedule's progress follows the fraction of the budget spent, whatever the machine
does. The run stops on the first step that finds the budget spent, so it ends within one step of it. A
schedule sized from a recent window instead, and only now and then, ends early when the machine speeds up
after a slow stretch: the steps left were counted at the slow rate and are done before the next sizing.

Both budgets together: the steps size the schedule and the time caps the run. Only the two numbers,
steps done and seconds spent, are read, never a clock, so a checkpoint's step and seconds resume the
same schedule.
"""
from __future__ import annotations

from scratchlm.errors import UserError

UNSIZED = 10**9   # the schedule's length before a step has been timed: a warmup, then a flat learning rate


class Budget:
    def __init__(self, seconds: float = 0.0, max_steps: int = 0):
        if not seconds and not max_steps:
            raise UserError("set train.max_steps or train.minutes (or both) so the run knows when to stop")
        self.seconds, self.max_steps = seconds, max_steps

    def total_steps(self, step: int, seconds: float) -> float:
        """The schedule's length, seen from `step` steps done in `seconds` seconds of training. Under a time
        budget it is a projection, and left fractional: rounded, it would move the learning rate back up
        by a hair each time it rounded the other way."""
        if self.max_steps:
            return self.max_steps
        if step == 0 or seconds <= 0:
            return UNSIZED
        return max(step + 1, step * self.seconds / seconds)

    def progress(self, step: int, seconds: float) -> float:
        """The fraction of the run done, as the learning-rate schedule sees it: steps over the schedule's
        length. Under a time budget that is the fraction of the seconds spent, whatever each step cost:
        steps of different sizes (train/accumulation.py) move it by their share of the time."""
        return min(1.0, step / self.total_steps(step, seconds))

    def done(self, step: int, seconds: float) -> bool:
        return bool(self.max_steps and step >= self.max_steps) or bool(self.seconds and seconds >= self.seconds)
