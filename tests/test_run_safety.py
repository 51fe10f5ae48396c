"""A run folder survives what happens to runs: a second writer, Ctrl-C and SIGTERM, a checkpoint cut
short, a resume, and a umask. Each case is built here as it happens: real processes holding the lock or
receiving the signal, files truncated on disk, and PyTorch's own optimizer as the reference."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tiny_chat import byte_tokenizer, one_thread, tiny_model
from conftest import tiny_run

from scratchlm import rundir
from scratchlm.cli import main
from scratchlm.config import TrainConfig, build_config, load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.loading import load_weights
from scratchlm.sft.train import finetune
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import distributed as dist
from scratchlm.train.lock import LOCK_NAME
from scratchlm.train.optim import build_optimizer
from scratchlm.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare-cpu.toml"
SMALL = tiny_run("train.eval_every=0", "train.optimizer=adamw", "train.threads=1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    with one_thread():
        yield


def config(corpus, *extra):
    return load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={corpus}", *SMALL, *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "loss" in r}


def cli_args(corpus, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "scratchlm", "pretrain", "--config", str(RECIPE), "--out", str(out)]
    for s in [f"data.dataset={corpus}", *SMALL, *extra]:
        args += ["--set", s]
    return args


# a. one writer per run folder

HOLDER = """
import sys, time
from scratchlm.train.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()   # until the test closes our stdin
"""


@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another live process holds; yields (folder, that process's pid)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_writer_is_refused_in_one_line_naming_the_pid(held, play_text, capsys):
    run, pid = held
    code = main(["pretrain", "--config", str(RECIPE), "--out", str(run), "--set", f"data.dataset={play_text}",
                 *[a for s in SMALL for a in ("--set", s)], "--set", "train.max_steps=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"pid {pid}" in err and str(run) in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]   # nothing of the refused run was written
    sft = build_config({"sft": {"init": str(run), "train": {"max_steps": 1}}})
    with pytest.raises(UserError, match=f"pid {pid}"):
        finetune(sft, run, progress=False)


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_notice(play_text, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{dead.pid}\n")
    result = pretrain(config(play_text, "train.max_steps=2"), run, progress=False)
    assert result["step"] == 2
    out = capsys.readouterr().out
    assert f"pid {dead.pid}, which no longer holds it" in out
    assert not (run / LOCK_NAME).exists()   # released when the run ended


def test_a_run_refused_for_a_mistake_leaves_no_folder_behind(tmp_path):
    with pytest.raises(UserError, match="sft.init"):
        finetune(build_config({"sft": {"init": str(tmp_path / "missing"), "train": {"max_steps": 1}}}),
                 tmp_path / "chat", progress=False)
    assert not (tmp_path / "chat").exists()


# b. Ctrl-C and SIGTERM: a checkpoint, a way to go on, and an exit status that says the run did not finish

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_exits_as_interrupted_and_resume_goes_on(play_text, tmp_path, sig):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_args(play_text, run, "train.max_steps=100000", "train.checkpoint_every=3"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not rundir.list_checkpoints(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]       # 130 for Ctrl-C, 143 for SIGTERM, as a shell says
    assert "--resume" in out and "Traceback" not in err
    stopped = json.loads((rundir.list_checkpoints(run)[-1] / "state.json").read_text())["step"]
    assert stopped == max(losses(run))

    more = subprocess.run(cli_args(play_text, run, f"train.max_steps={stopped + 2}", "train.checkpoint_every=3",
                                   "train.resume=auto"), env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"from step {stopped}" in more.stdout
    assert sorted(losses(run)) == list(range(1, stopped + 3))


# c. a checkpoint cut short: resume from the newest whole one, and say so

@pytest.mark.parametrize("damage", ["truncate model.safetensors", "truncate optimizer.safetensors",
                                    "delete optimizer.safetensors", "delete model.safetensors", "garble state.json"])
def test_resume_skips_a_checkpoint_cut_short(play_text, tmp_path, capsys, damage):
    settings = ["train.max_steps=8", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    pretrain(config(play_text, *settings), straight, progress=False)
    # The same run, as if it had died after step 6 was checkpointed, and that checkpoint had lost a file.
    shutil.copytree(straight, run)
    shutil.rmtree(rundir.list_checkpoints(run)[-1])
    action, name = damage.split()
    damaged = rundir.list_checkpoints(run)[-1] / name
    if action == "truncate":
        with open(damaged, "r+b") as f:
            f.truncate(damaged.stat().st_size // 2)
    elif action == "garble":
        damaged.write_bytes(b'{"step": 6, "rng": [')
    else:
        damaged.unlink()
    capsys.readouterr()
    result = pretrain(config(play_text, *settings, "train.resume=auto"), run, progress=False)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "step_00000003" in notes[0] and "step_00000006" in notes[0] and name in notes[0]
    assert "from step 3" in out and result["step"] == 8
    assert losses(run) == losses(straight)   # steps 4-6 trained again, as they were the first time


def test_resume_drops_a_metrics_line_cut_short_and_refuses_a_garbled_one(play_text, tmp_path, capsys):
    settings = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    pretrain(config(play_text, *settings), straight, progress=False)
    shutil.copytree(straight, run)
    shutil.rmtree(rundir.list_checkpoints(run)[-1])
    metrics = run / "metrics.jsonl"
    # killed while writing the row of step 4: the file ends mid-line
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 3]
    metrics.write_text("".join(line + "\n" for line in kept) + '{"step": 4, "lo')
    capsys.readouterr()
    pretrain(config(play_text, *settings, "train.resume=auto"), run, progress=False)
    assert "dropped its last line" in capsys.readouterr().out
    assert losses(run) == losses(straight)
    # a damaged line in the middle is not a crash's trace: say which line, change nothing
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    before = metrics.read_bytes()
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a metrics row"):
        pretrain(config(play_text, "train.max_steps=8", "train.checkpoint_every=3", "train.resume=auto"), run,
                 progress=False)
    assert metrics.read_bytes() == before


def test_resume_with_no_whole_checkpoint_is_one_line(play_text, tmp_path):
    run = tmp_path / "run"
    pretrain(config(play_text, "train.max_steps=2"), run, progress=False)
    (rundir.list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint in .* is whole: step_00000002 .model.safetensors is truncated"):
        pretrain(config(play_text, "train.max_steps=4", "train.resume=auto"), run, progress=False)


# d. the optimizer comes back as it was

def same(a, b) -> bool:
    """Equal values of the same types all the way down (a tuple is not a list)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_optimizer_state_dict_equals_the_uninterrupted_one(tmp_path, optimizer):
    tc = TrainConfig(optimizer=optimizer, lr=1e-2)
    torch.manual_seed(0)
    model = tiny_model(64)
    opt = build_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))

    def step(m, o):
        m(x, targets=x).backward()
        o.step()
        o.zero_grad(set_to_none=True)

    for _ in range(3):
        step(model, opt)
    saved = ckpt.save_checkpoint(tmp_path, 3, model, dist.full_optimizer_state(model, opt), {"loader": {}})

    resumed_model = tiny_model(64)
    load_weights(resumed_model, saved)
    resumed = build_optimizer(resumed_model, tc, torch.device("cpu"))
    state = ckpt.load_training_state(saved)
    dist.load_optimizer_state(resumed_model, resumed, ckpt.read_optimizer_state(saved, state))

    parts, resumed_parts = getattr(opt, "parts", [opt]), getattr(resumed, "parts", [resumed])
    for a, b in zip(parts, resumed_parts):
        assert same(a.state_dict(), b.state_dict())
    step(model, opt)
    step(resumed_model, resumed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


# e. the run's tokenizer is readable by whoever may read the run

def test_the_run_tokenizer_gets_the_umask_permissions_not_its_source_folders(play_text, tmp_path):
    private = Path(tempfile.mkdtemp(dir=tmp_path))            # 0700, as mkdtemp makes it
    byte_tokenizer(chat=False).save(private)
    for f in private.iterdir():
        f.chmod(0o600)
    before = os.umask(0o022)
    try:
        pretrain(config(play_text, "train.max_steps=1", f"data.tokenizer={private}"), tmp_path / "run", progress=False)
    finally:
        os.umask(before)
    folder = tmp_path / "run" / "tokenizer"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files)
    assert sorted(f.name for f in files) == sorted(f.name for f in private.iterdir())
