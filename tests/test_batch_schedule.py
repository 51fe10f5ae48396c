"""The batch's schedules (train/accumulation.py): sequence-length warmup and batch-size warmup, against
tables worked by hand, in tiny runs (metrics.jsonl and the token count), across a resume, and refused
in one line where a value is out of range or the batch source cannot change shape."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run
from tiny_chat import one_thread

from scratchlm import rundir
from scratchlm.config import TrainConfig, build_config, load_config, recipe_path
from scratchlm.data.loader import RandomWindows
from scratchlm.errors import UserError
from scratchlm.model.info import flops_per_token
from scratchlm.train import distributed as dist
from scratchlm.train.accumulation import StepShape, batch_tokens_at, step_shape, window_at
from scratchlm.train.budget import Budget
from scratchlm.train.loop import _batch_schedules
from scratchlm.train.mfu import Throughput
from scratchlm.train.pretrain import pretrain

TINY = build_config({}, ["model.context=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"]).model
SMALL = tiny_run("train.eval_every=0", "train.optimizer=adamw", "train.max_steps=8")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    with one_thread():
        yield


def run(corpus, out: Path, *extra: str) -> list[dict]:
    cfg = load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={corpus}", *SMALL, *extra])
    pretrain(cfg, out, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# the schedules, point by point

@pytest.mark.parametrize("context, start, fraction, table", [
    # halvings 256, 128, 64; the length ramp 64 + 192 * p / 0.5 reaches 128 at p = 1/6, 256 at p = 0.5
    (256, 64, 0.5, {0.0: 64, 0.1: 64, 0.16: 64, 0.17: 128, 0.3: 128, 0.49: 128, 0.5: 256, 0.8: 256, 1.0: 256}),
    # 100 is no halving of 256: the shortest is 128, the last one not under it; the ramp 128 + 128 * p
    (256, 100, 1.0, {0.0: 128, 0.5: 128, 0.99: 128, 1.0: 256}),
    # a context that is no power of two: 96, 48, 24 (12 < 20); the ramp 24 + 72 * p reaches 48 at p = 1/3
    (96, 20, 1.0, {0.0: 24, 0.33: 24, 0.34: 48, 0.99: 48, 1.0: 96}),
    (64, 64, 0.5, {0.0: 64, 0.5: 64, 1.0: 64}),        # starting at the context: nothing to grow
    (64, 0, 0.5, {0.0: 64, 0.5: 64, 1.0: 64}),         # off
])
def test_window_length_by_hand(context, start, fraction, table):
    train = TrainConfig(micro_batch=4, seq_len_start=start, seq_len_warmup=fraction)
    assert {p: window_at(train, context, p) for p in table} == table


def test_shorter_windows_come_in_more_rows_of_the_same_tokens():
    train = TrainConfig(micro_batch=4, batch_tokens=2048, seq_len_start=64, seq_len_warmup=0.5)  # 2 micro-batches
    assert step_shape(train, 256, 1, 0.0) == StepShape(2, 16, 64)
    assert step_shape(train, 256, 1, 0.2) == StepShape(2, 8, 128)
    assert step_shape(train, 256, 1, 0.5) == StepShape(2, 4, 256)
    assert {step_shape(train, 256, 1, p).tokens() for p in (0.0, 0.2, 0.5, 1.0)} == {2048}
    # 96 tokens halved to 24: four times the rows; on two processes, each draws its share
    train = TrainConfig(micro_batch=3, seq_len_start=20, seq_len_warmup=1.0)
    assert step_shape(train, 96, 2, 0.0) == StepShape(1, 12, 24) and step_shape(train, 96, 2, 0.0).tokens(2) == 576


@pytest.mark.parametrize("world, table", [
    # full: 4 rows x 32 tokens x 4 micro-batches = 512; asked 64 + 448 * p / 0.5 tokens, in whole rows of 32,
    # as equal micro-batches of at most 4 rows
    (1, {0.0: (64, StepShape(1, 2, 32)), 0.1: (153.6, StepShape(1, 4, 32)), 0.25: (288, StepShape(3, 3, 32)),
         0.4: (422.4, StepShape(4, 3, 32)), 0.5: (512, StepShape(4, 4, 32)), 1.0: (512, StepShape(4, 4, 32))}),
    # two processes: 2 micro-batches each make the 512; rows per process = tokens // (2 * 32), at least one
    (2, {0.0: (64, StepShape(1, 1, 32)), 0.25: (288, StepShape(1, 4, 32)), 0.4: (422.4, StepShape(2, 3, 32)),
         0.5: (512, StepShape(2, 4, 32))}),
])
def test_batch_size_by_hand(world, table):
    train = TrainConfig(micro_batch=4, batch_tokens=512, batch_start_tokens=64, batch_warmup=0.5)
    for p, (asked, shape) in table.items():
        assert batch_tokens_at(train, 32, world, p) == pytest.approx(asked)
        assert step_shape(train, 32, world, p) == shape


def test_both_schedules_together_by_hand():
    # windows 8 -> 16 -> 32 over half the run (16 from p = 1/6); tokens 32 -> 256 over all of it (accum 2)
    train = TrainConfig(micro_batch=4, batch_tokens=256, seq_len_start=8, seq_len_warmup=0.5,
                        batch_start_tokens=32, batch_warmup=1.0)
    assert step_shape(train, 32, 1, 0.0) == StepShape(1, 4, 8)        # 32 tokens: 4 rows of 8
    assert step_shape(train, 32, 1, 0.25) == StepShape(1, 5, 16)      # 88 tokens: 5 rows of 16 (80)
    assert step_shape(train, 32, 1, 0.5) == StepShape(1, 4, 32)       # 144 tokens: 4 rows of 32
    assert step_shape(train, 32, 1, 0.75) == StepShape(2, 3, 32)      # 200 tokens: 6 rows, 2 micro-batches
    assert step_shape(train, 32, 1, 1.0) == StepShape(2, 4, 32)


def test_progress_is_the_fraction_the_lr_schedule_sees():
    assert Budget(max_steps=40).progress(10, 999.0) == 0.25
    assert Budget(seconds=100).progress(10, 25.0) == pytest.approx(0.25)   # a timed run: the time spent
    assert Budget(seconds=100).progress(0, 0.0) < 1e-8                      # before a step is timed: the start
    assert Budget(max_steps=40).progress(50, 0.0) == 1.0


def test_mfu_counts_the_flops_of_the_window_trained_on():
    throughput = Throughput(100.0, peak=1000.0)
    throughput.add(10, 1.0, 50.0)     # rows of half the context: attention costs less
    throughput.add(10, 1.0)           # full rows: the flops the throughput was made with
    assert throughput.read() == {"tokens_per_s": 10.0, "mfu": pytest.approx((500 + 1000) / 2 / 1000)}
    assert flops_per_token(TINY, 16) < flops_per_token(TINY, 32) == flops_per_token(TINY)


# the loader

def test_a_short_window_is_the_start_of_the_full_one_and_the_processes_split_the_rows():
    shard = np.arange(5000, dtype=np.uint16)
    full = RandomWindows([shard], 16, 4, seed=7).next_batch(6, 16)
    short = RandomWindows([shard], 16, 4, seed=7).next_batch(6, 4)
    assert short[0].shape == (6, 4) and torch.equal(short[0], full[0][:, :4]) and torch.equal(short[1], full[1][:, :4])
    ranks = [RandomWindows([shard], 16, 4, seed=7, rank=r, world=2).next_batch(3, 4)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), short[0])
    with pytest.raises(ValueError, match="longer than the context"):
        RandomWindows([shard], 16, 4, seed=7).next_batch(6, 17)


# tiny runs

def test_a_run_with_sequence_length_warmup_logs_its_windows_and_counts_its_tokens(play_text, tmp_path):
    rows = run(play_text, tmp_path / "run", "train.seq_len_start=8", "train.seq_len_warmup=0.5")
    steps = [r for r in rows if "loss" in r]
    # 8 steps: the ramp 8 + 24 * (s / 8) / 0.5 over the 0-based step s reaches 16 at s = 2 and 32 at s = 4
    assert [r["window"] for r in steps] == [8, 8, 16, 16, 32, 32, 32, 32]
    assert [r["batch_tokens"] for r in steps] == [4 * 32] * 8        # 16, 8, then 4 rows: the same tokens
    assert rows[-1]["final"] and rows[-1]["tokens"] == 8 * 128


def test_a_run_with_batch_size_warmup_logs_its_batches_and_counts_its_tokens(play_text, tmp_path):
    rows = run(play_text, tmp_path / "run", "train.batch_tokens=256", "train.batch_start_tokens=32",
               "train.batch_warmup=0.5")
    steps = [r for r in rows if "loss" in r]
    # 32 + 224 * (s / 8) / 0.5 tokens: 32, 88, 144, 200, then the full 256; whole rows of 32 in equal
    # micro-batches of at most 4 rows: 1, 2, 4, 6 (2 x 3), 8 (2 x 4)
    assert [r["batch_tokens"] for r in steps] == [32, 64, 128, 192, 256, 256, 256, 256]
    assert [r["window"] for r in steps] == [32] * 8
    assert [r["tokens"] for r in steps] == [32, 96, 224, 416, 672, 928, 1184, 1440]
    assert rows[-1]["tokens"] == 1440


def test_a_resumed_run_draws_the_same_batches_as_an_uninterrupted_one(play_text, tmp_path):
    settings = ["train.checkpoint_every=3", "train.keep_checkpoints=5", "train.batch_tokens=256",
                "train.seq_len_start=8", "train.seq_len_warmup=0.5", "train.batch_start_tokens=32",
                "train.batch_warmup=0.75"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    expected = run(play_text, straight, *settings)
    # as if the run had died after the checkpoint of step 3: steps 4 to 8 cross both schedules' changes
    shutil.copytree(straight, resumed)
    for later in rundir.list_checkpoints(resumed)[1:]:
        shutil.rmtree(later)
    got = run(play_text, resumed, *settings, "train.resume=auto")
    keys = ("step", "loss", "window", "batch_tokens", "tokens")
    steps = [[r[k] for k in keys] for r in expected if "loss" in r]
    assert [[r[k] for k in keys] for r in got if "loss" in r] == steps
    assert len({window for _, _, window, _, _ in steps}) == 3 and len({batch for _, _, _, batch, _ in steps}) > 2
    assert got[-1]["val_loss"] == expected[-1]["val_loss"] and got[-1]["tokens"] == expected[-1]["tokens"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_two_processes_follow_the_schedule_as_one_does(play_text, tmp_path):
    """Under DDP every process computes the same shape and draws its share of the same global rows: two
    processes of micro-batch 2 train as one of micro-batch 4, window for window."""
    def train(out: Path, processes: int, micro_batch: int) -> list[dict]:
        args = ["-m", "scratchlm", "pretrain", "--config", str(recipe_path("shakespeare-cpu.toml")), "--out", str(out)]
        for s in [f"data.dataset={play_text}", *SMALL, f"train.micro_batch={micro_batch}", "train.threads=1",
                  "train.seq_len_start=8", "train.seq_len_warmup=0.5"]:
            args += ["--set", s]
        if processes > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
        done = subprocess.run([sys.executable, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    one, two = train(tmp_path / "one", 1, 4), train(tmp_path / "two", 2, 2)
    assert [r["window"] for r in two] == [r["window"] for r in one] == [8, 8, 16, 16, 32, 32, 32, 32]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2e-5, abs=2e-5)


# refusals

@pytest.mark.parametrize("setting, message", [
    ("train.seq_len_start=64", r"train.seq_len_start = 64 is longer than model.context = 32"),
    ("train.batch_start_tokens=129", r"train.batch_start_tokens = 129 is more than the full batch of 128 tokens"),
    ("train.seq_len_warmup=0", r"train.seq_len_warmup = 0.0 is out of range: it must be in \(0, 1\]"),
    ("train.seq_len_warmup=1.5", r"train.seq_len_warmup = 1.5 is out of range"),
    ("train.batch_warmup=0", r"train.batch_warmup = 0.0 is out of range: it must be in \(0, 1\]"),
    ("train.batch_warmup=-0.1", r"train.batch_warmup = -0.1 is out of range"),
    ("train.seq_len_start=-1", r"train.seq_len_start = -1 is out of range"),
])
def test_out_of_range_values_are_one_line(setting, message):
    overrides = ["model.context=32", "train.micro_batch=4", setting]
    with pytest.raises(UserError, match=message) as e:
        build_config({}, overrides)
    assert "\n" not in str(e.value)
    build_config({}, ["model.context=32", "train.micro_batch=4", "train.seq_len_start=32",
                      "train.batch_start_tokens=128", "train.seq_len_warmup=1", "train.batch_warmup=1"])


def test_the_full_batch_is_that_of_the_processes_there_are():
    train = TrainConfig(micro_batch=4, batch_tokens=1000, batch_start_tokens=800)
    train.check_batch_schedules(32)                          # one process: 7 micro-batches, 896 tokens
    with pytest.raises(UserError, match="more than the full batch of 768 tokens"):
        train.check_batch_schedules(32, world=2)             # two: 3 micro-batches each, 768 tokens


def test_a_batch_source_of_one_shape_is_refused_in_one_line():
    class Packed:   # as SFT's packed examples: next_batch() draws its own shape
        def next_batch(self):
            raise AssertionError("not reached")

    cfg = build_config({}, ["model.context=32", "train.micro_batch=4", "train.seq_len_start=8"])
    with pytest.raises(UserError, match=r"apply to pretraining only; .*sft.train.seq_len_start=0"):
        _batch_schedules(cfg, Packed(), dist.Dist())
    assert _batch_schedules(cfg, RandomWindows([np.arange(100, dtype=np.uint16)], 32, 4, seed=0), dist.Dist())
    assert not _batch_schedules(build_config({}, ["model.context=32"]), Packed(), dist.Dist())


def test_sft_stage_does_not_inherit_the_pretraining_batch_schedules():
    from scratchlm.sft.train import stage_config

    cfg = build_config({"train": {"seq_len_start": 64, "batch_start_tokens": 512}})
    stage = stage_config(cfg).train
    assert (stage.seq_len_start, stage.batch_start_tokens) == (0, 0)
    assert cfg.train.seq_len_start == 64   # the pretraining stage keeps them
    asked = build_config({"train": {"seq_len_start": 64}, "sft": {"train": {"seq_len_start": 32}}})
    assert stage_config(asked).train.seq_len_start == 32   # asked for in [sft.train]: kept, and refused at the start
