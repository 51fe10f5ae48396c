"""torchrun on the CPU (gloo): two processes train exactly like one with the same global batch, under DDP
and FSDP2, and checkpoints move between process counts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare-cpu.toml"
SETTINGS = tiny_run("train.eval_every=4", "train.eval_tokens=512", "train.checkpoint_every=4", "train.keep_checkpoints=5",
                    "train.threads=1", "train.optimizer=adamw")  # the recipe's Muon does not run under FSDP

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this PyTorch build has no gloo backend")


def train(corpus, out, processes: int, *extra: str, cache: Path) -> None:
    sets = [f"data.dataset={corpus}", *SETTINGS, *extra]
    args = ["-m", "scratchlm", "pretrain", "--config", str(RECIPE), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "SCRATCHLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r} | {
        -r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=2e-5, abs=2e-5), (k, la[k], lb[k])


@pytest.fixture(scope="module")
def single(play_text, tmp_path_factory):
    """The reference: one process, micro-batch 4, 8 steps."""
    root = tmp_path_factory.mktemp("single")
    train(play_text, root / "run", 1, "train.micro_batch=4", "train.max_steps=8", cache=root / "cache")
    return root / "run", root / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(single, play_text, tmp_path, strategy):
    run, cache = single
    train(play_text, tmp_path / "two", 2, "train.micro_batch=2", "train.max_steps=8", f"train.parallel={strategy}",
          cache=cache)
    assert_same_run(run, tmp_path / "two")


def kill_after_first_checkpoint(run: Path) -> None:
    """As if the run had died just after its first checkpoint (step 4): later ones never happened; the
    metrics rows past it are dropped by the resumed run itself."""
    for later in sorted((run / "checkpoints").glob("step_*"))[1:]:
        shutil.rmtree(later)


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(single, play_text, tmp_path):
    run, cache = single
    # written by two processes (FSDP, sharded weights), resumed by one ...
    train(play_text, tmp_path / "a", 2, "train.micro_batch=2", "train.max_steps=8", "train.parallel=fsdp",
          cache=cache)
    kill_after_first_checkpoint(tmp_path / "a")
    train(play_text, tmp_path / "a", 1, "train.micro_batch=4", "train.max_steps=8", "train.resume=auto", cache=cache)
    assert_same_run(run, tmp_path / "a")
    # ... and written by one, resumed by two (DDP)
    train(play_text, tmp_path / "b", 1, "train.micro_batch=4", "train.max_steps=8", cache=cache)
    kill_after_first_checkpoint(tmp_path / "b")
    train(play_text, tmp_path / "b", 2, "train.micro_batch=2", "train.max_steps=8", "train.resume=auto", cache=cache)
    assert_same_run(run, tmp_path / "b")
