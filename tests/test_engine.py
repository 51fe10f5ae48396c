"""The training engine's promises: float32 master weights under autocast, options that change speed or
memory but not the result, and runs that survive SIGKILL and SIGTERM."""
from __future__ import annotations

import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import tiny_run

from scratchlm.config import load_config, recipe_path
from scratchlm import rundir
from scratchlm.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
SMALL = tiny_run("train.eval_every=0", "train.optimizer=adamw")  # AdamW's moments are what these check


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))


def run(corpus, out, *extra):
    cfg = load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={corpus}", *SMALL, *extra])
    result = pretrain(cfg, out, progress=False)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in rows if "loss" in r]


def test_bf16_autocast_keeps_weights_and_optimizer_state_float32(play_text, tmp_path):
    _, losses = run(play_text, tmp_path / "run", "train.max_steps=3", "train.precision=bf16",
                    "train.checkpoint_every=3")
    last = rundir.list_checkpoints(tmp_path / "run")[-1]
    weights = load_file(last / "model.safetensors")
    moments = load_file(last / "optimizer.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert any("exp_avg" in k for k in moments) and all(t.dtype == torch.float32 for t in moments.values())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_batch_tokens_accumulates_to_the_same_step(play_text, tmp_path):
    # 2 micro-batches of 2 sequences give the gradient of one batch of 4 (the same windows are drawn)
    _, whole = run(play_text, tmp_path / "a", "train.max_steps=4")
    _, accumulated = run(play_text, tmp_path / "b", "train.max_steps=4", "train.micro_batch=2",
                         f"train.batch_tokens={4 * 32}")
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_activation_checkpointing_and_reference_ops_do_not_change_the_result(play_text, tmp_path):
    _, plain = run(play_text, tmp_path / "a", "train.max_steps=4")
    _, recomputed = run(play_text, tmp_path / "b", "train.max_steps=4", "train.activation_checkpointing=true")
    _, reference = run(play_text, tmp_path / "c", "train.max_steps=4", "train.implementation=reference")
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert reference == pytest.approx(plain, rel=1e-4)


def test_nan_losses_stop_the_run_with_the_checkpoint_intact(play_text, tmp_path, monkeypatch):
    from scratchlm.errors import UserError

    run(play_text, tmp_path / "run", "train.max_steps=2")
    good = load_file(rundir.list_checkpoints(tmp_path / "run")[-1] / "model.safetensors")
    with pytest.raises(UserError, match="non-finite losses"):
        run(play_text, tmp_path / "run", "train.max_steps=10", "train.lr=1e30", "train.resume=auto",
            "train.checkpoint_every=1", "train.grad_clip=0")
    kept = load_file(rundir.list_checkpoints(tmp_path / "run")[-1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values()) and kept.keys() == good.keys()


def _cli(play_text, out, cache, *extra):
    args = [sys.executable, "-m", "scratchlm", "pretrain", "--config", str(ROOT / "recipes" / "shakespeare-cpu.toml"),
            "--out", str(out)]
    for s in [f"data.dataset={play_text}", *SMALL, "train.max_steps=300", "train.checkpoint_every=3",
              "train.keep_checkpoints=0", *extra]:
        args += ["--set", s]
    return args, {**os.environ, "SCRATCHLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for_checkpoint(proc, run_dir, step):
    # every checkpoint is kept (keep_checkpoints=0), and the run is long enough that the signal lands mid-run
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / f"step_{step:08d}").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before the checkpoint"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_run_repeats_the_uninterrupted_losses_exactly(play_text, tmp_path, sig):
    args, env = _cli(play_text, tmp_path / "straight", tmp_path / "cache")
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)

    args, env = _cli(play_text, tmp_path / "killed", tmp_path / "cache")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, tmp_path / "killed", 6)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # a polite stop saves where it is, says how to go on, and exits as stopped
        assert proc.returncode == 128 + signal.SIGTERM and "--resume" in out
        stopped = int(json.loads((rundir.list_checkpoints(tmp_path / "killed")[-1] / "state.json").read_text())["step"])
        assert stopped == max(_losses(tmp_path / "killed"))
    else:
        assert proc.returncode == -signal.SIGKILL
    args, env = _cli(play_text, tmp_path / "killed", tmp_path / "cache", "train.resume=auto")
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # bitwise


def test_tensorboard_events_hold_the_logged_losses(play_text, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, losses = run(play_text, tmp_path / "run", "train.max_steps=5", 'train.log_to=["tensorboard"]')
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5]
    assert [e.value for e in logged] == pytest.approx(losses, rel=1e-6)
    assert "val_bpb" in events.Tags()["scalars"]  # the final evaluation


def test_wandb_gets_rows_offline_without_an_api_key(play_text, tmp_path, monkeypatch):
    import sys
    import types

    calls = {"log": [], "init": None}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class FakeRun:
        def log(self, row, step):
            calls["log"].append((step, row))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _, losses = run(play_text, tmp_path / "run", "train.max_steps=3", 'train.log_to=["wandb"]')
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"]["train"]["max_steps"] == 3
    assert [row["loss"] for step, row in calls["log"] if "loss" in row] == losses and calls["finished"]


def test_unknown_or_missing_logger_is_one_line(play_text, tmp_path):
    from scratchlm.errors import UserError

    with pytest.raises(UserError, match="'tensorbored' is not one of tensorboard, wandb"):
        run(play_text, tmp_path / "run", "train.max_steps=1", 'train.log_to=["tensorbored"]')


def test_the_engine_imports_no_stage():
    """train/ is the engine: the stages (pretrain's data and validation, sft, plots) import it, not the
    reverse. train/pretrain.py is the one stage kept in the package."""
    from test_imports import import_graph

    graph = import_graph()
    engine = [m for m in graph if m.startswith("scratchlm.train") and m != "scratchlm.train.pretrain"]
    assert "scratchlm.train.loop" in engine
    stages = ("scratchlm.data", "scratchlm.eval", "scratchlm.viz", "scratchlm.sft")
    assert {m: sorted(i for i in graph[m] if i.startswith(stages)) for m in engine
            if any(i.startswith(stages) for i in graph[m])} == {}
