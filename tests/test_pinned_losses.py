"""The speedrun's numerics, pinned: the per-step training losses of a short fixed-seed run of the demo
recipe (`recipes/shakespeare-cpu.toml`, what `scratchlm demo` trains on a CPU) at float32, compared with
the losses recorded in tests/assets/losses/demo_fp32.txt.

A refactor of the engine, the model or the optimizers that keeps this test passing keeps the speedrun's
training the same step for step, not only "still converging". The run keeps the recipe's model (the `tiny`
preset at d_model 128, two heads), its optimizer (Muon), schedule and seed, and shrinks only what sets the
cost: the corpus (conftest's synthetic play), the vocabulary, the context and the micro-batch, so it runs in
a few seconds on one thread.

The tolerance is 1e-4 relative: CPUs differ in their float32 kernels (vector width, summation order), which
moves the last digits, not the fourth.

When a change is meant to alter the numbers (a new initialisation, a different default), rewrite the file
with the same run and say why in the commit:

    SCRATCHLM_PIN_LOSSES=1 PYTHONPATH=src python -m pytest -q tests/test_pinned_losses.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_chat import one_thread

from scratchlm.config import load_config, recipe_path
from scratchlm.train.pretrain import pretrain

PINNED = Path(__file__).parent / "assets" / "losses" / "demo_fp32.txt"
STEPS = 30   # the recipe's 20 warmup steps and 10 of its cosine decay
SHRUNK = ["train.precision=fp32", "train.device=cpu", f"train.max_steps={STEPS}", "train.minutes=0",
          "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "data.vocab_size=512",
          "model.context=64", "train.micro_batch=4"]


def demo_losses(corpus: Path, out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step of the shrunk demo run on `corpus`, trained into `out`."""
    cfg = load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={corpus}", *SHRUNK])
    with one_thread():
        pretrain(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def read_pinned(path: Path = PINNED) -> list[tuple[int, float]]:
    pairs = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [(int(step), float(loss)) for step, loss in pairs]


def write_pinned(losses: list[tuple[int, float]], path: Path = PINNED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# step loss: recipes/shakespeare-cpu.toml shrunk as in tests/test_pinned_losses.py (SHRUNK)\n"
    path.write_text(header + "".join(f"{step} {loss!r}\n" for step, loss in losses))


def test_demo_recipe_losses_match_the_pinned_ones(play_text, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    losses = demo_losses(play_text, tmp_path / "run")
    if os.environ.get("SCRATCHLM_PIN_LOSSES") == "1":
        write_pinned(losses)
    pinned = read_pinned()
    assert [s for s, _ in losses] == [s for s, _ in pinned] == list(range(1, STEPS + 1))
    assert [v for _, v in losses] == pytest.approx([v for _, v in pinned], rel=1e-4)
    assert pinned[-1][1] < pinned[0][1] - 1   # the pinned run learns: the file is not a record of a broken one
