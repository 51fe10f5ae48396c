"""End to end: text file -> tokenizer -> shards -> pretraining -> run folder -> load, generate, resume.

The fast tests use a small synthetic play and a model of a few thousand parameters; the slow test runs the
real demo path on the real Shakespeare corpus for a few steps.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from conftest import tiny_run

import scratchlm
from scratchlm.config import load_config, recipe_path
from scratchlm.data.shards import open_split
from scratchlm.infer.generate import SamplingParams, generate
from scratchlm.tokenizer import Tokenizer
from scratchlm import rundir
from scratchlm.train.pretrain import pretrain

SMALL = tiny_run("train.eval_every=4", "train.eval_tokens=256")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))


def small_config(corpus, *extra):
    return load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={corpus}", *SMALL, *extra])


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_has_everything_and_loads(play_text, tmp_path):
    run = tmp_path / "run"
    result = pretrain(small_config(play_text, "train.max_steps=12", "train.checkpoint_every=6", "train.keep_best=false"),
                      run, progress=False)

    assert (run / "config.toml").is_file() and (run / "loss.png").stat().st_size > 1000
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step_00000006", "step_00000012"]
    weights = load_file(rundir.list_checkpoints(run)[-1] / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # CPU training stays float32
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))

    log = rows(run)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"step", "tokens", "loss", "lr"} <= set(r) for r in steps)
    assert steps[-1]["tokens"] == 12 * 4 * 32
    evals = [r for r in log if "val_bpb" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 12] and evals[-1]["final"]
    assert steps[-1]["loss"] < steps[0]["loss"]

    loaded = scratchlm.load(run)
    assert loaded.config.model.d_model == 32 and loaded.tokenizer.vocab_size == 300
    ids = torch.tensor([loaded.tokenizer.encode("ROMEO.\nLove night")] * 2)
    logits = loaded.model(ids)
    assert logits.shape == (2, ids.shape[1], 300)

    # The final eval's bits per byte, recomputed here from its definition over the whole val split.
    val = np.concatenate(open_split(next((tmp_path / "cache" / "shards").iterdir()), "val")).astype(np.int64)
    nats, nbytes = 0.0, 0
    lengths = loaded.tokenizer.token_byte_lengths()
    with torch.no_grad():
        for start in range(0, len(val) - 1, 32):
            chunk = torch.from_numpy(val[start:start + 33])
            if len(chunk) < 2:
                break
            out = loaded.model(chunk[None, :-1])[0]
            nats += F.cross_entropy(out, chunk[1:], reduction="sum").item()
            nbytes += sum(lengths[t] for t in chunk[1:].tolist())
    assert result["val_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-4)
    assert result["val_bytes"] == nbytes


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_a_kill_repeats_the_same_losses_bit_for_bit(play_text, tmp_path, optimizer):
    config = ["train.max_steps=10", "train.checkpoint_every=4", "train.keep_checkpoints=5",
              f"train.optimizer={optimizer}"]
    straight = tmp_path / "straight"
    pretrain(small_config(play_text, *config), straight, progress=False)

    # The same run, killed some time after its step-4 checkpoint: later checkpoints never happened and
    # metrics.jsonl holds rows the resumed run must replace.
    killed = tmp_path / "killed"
    pretrain(small_config(play_text, *config), killed, progress=False)
    for later in rundir.list_checkpoints(killed)[1:]:
        shutil.rmtree(later)
    (killed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows(killed) if r["step"] <= 7 and not r.get("final")))
    pretrain(small_config(play_text, *config, "train.resume=auto"), killed, progress=False)

    def untimed(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds", "mfu")} for r in rows(run)]

    assert untimed(killed) == untimed(straight)
    a = load_file(rundir.list_checkpoints(straight)[-1] / "model.safetensors")
    b = load_file(rundir.list_checkpoints(killed)[-1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FakeClock:
    """The training loop's clock, made to say that step n took `seconds(n)`, whatever the machine is doing:
    the loop reads it twice a step, before and after."""

    def __init__(self, seconds):
        self.now, self.calls, self.seconds = 0.0, 0, seconds

    def perf_counter(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += self.seconds(self.calls // 2)
        return self.now


def _budget_run(play_text, tmp_path, monkeypatch, seconds):
    from scratchlm.train import loop

    monkeypatch.setattr(loop, "time", FakeClock(seconds))
    result = pretrain(small_config(play_text, "train.minutes=0.05", "train.eval_every=0"), tmp_path / "run",
                      progress=False)
    logged = [r for r in rows(tmp_path / "run") if "lr" in r]
    return result, [r["seconds"] for r in logged], [r["lr"] for r in logged]


def test_time_budget_sizes_the_schedule(play_text, tmp_path, monkeypatch):
    # 3 s of budget at 10 ms a step: 300 steps, and the cosine ends at its floor with the budget
    result, seconds, lrs = _budget_run(play_text, tmp_path, monkeypatch, lambda n: 0.01)
    assert 295 <= result["step"] <= 301 and seconds[-1] == pytest.approx(3.0, abs=0.02)
    assert lrs[-1] == pytest.approx(0.1 * max(lrs), rel=0.05)


def test_time_budget_holds_when_the_machine_slows_down(play_text, tmp_path, monkeypatch):
    """Steps become five times slower after the schedule was first sized (another process took the
    cores): the run must still end on its budget with its learning rate decayed, not be cut off mid-way."""
    result, seconds, lrs = _budget_run(play_text, tmp_path, monkeypatch, lambda n: 0.01 if n <= 40 else 0.05)
    # 0.4 s for the first 40 steps, then 2.6 s at 50 ms: about 92 steps in all
    assert 85 <= result["step"] <= 95 and seconds[-1] == pytest.approx(3.0, abs=0.1)
    assert lrs[-1] < 0.15 * max(lrs)


def test_an_existing_run_is_not_overwritten(play_text, tmp_path):
    run = tmp_path / "run"
    pretrain(small_config(play_text, "train.max_steps=2"), run, progress=False)
    with pytest.raises(scratchlm.errors.UserError, match="--resume"):
        pretrain(small_config(play_text, "train.max_steps=2"), run, progress=False)


@pytest.mark.slow
def test_demo_path_on_real_shakespeare(shared_cache, monkeypatch, tmp_path, capsys):
    """The demo's own code on the real corpus, cut to a few steps: every stage and the printed report."""
    monkeypatch.setenv("SCRATCHLM_CACHE", str(shared_cache))
    from scratchlm.demo import run_demo

    cut = ["train.max_steps=30", "train.eval_every=0", "model.n_layers=1", "data.vocab_size=512"]
    result = run_demo(minutes=5, out=tmp_path / "demo", progress=False, overrides=cut)
    printed = capsys.readouterr().out
    assert 505_687 - 20 < result["val_bytes"] < 505_687  # the whole val split but its first token
    assert result["val_bpb"] < 5
    for expected in ("bits per byte", "ROMEO.", "scratchlm generate --checkpoint", "loss.png"):
        assert expected in printed
    tok = Tokenizer.load(tmp_path / "demo" / "tokenizer")
    assert tok.vocab_size == 512
    params = SamplingParams(max_new_tokens=20, temperature=0.0, seed=0)
    loaded = scratchlm.load(tmp_path / "demo")
    assert len(generate(loaded.model, tok.encode("ROMEO.\n"), params)) == 20
