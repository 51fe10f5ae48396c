"""Where commands write: a file standing where a folder should be, the permissions of what is written,
and output files from other runs read back (plot). Each hostile input is built here."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import one_line_error
from tiny_chat import make_run

from scratchlm.cli import main

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "shakespeare-cpu.toml")


pytestmark = pytest.mark.usefixtures("offline_cache")




@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50)
    return path


def test_tokenizer_out_pointing_at_a_file(tmp_path, corpus, capsys):
    target = tmp_path / "taken"
    target.write_text("a file the user cares about\n")
    err = one_line_error(capsys, ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                                  "--out", str(target)])
    assert str(target) in err and "is a file" in err
    assert target.read_text() == "a file the user cares about\n"
    err = one_line_error(capsys, ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                                  "--out", str(target / "below")])
    assert "is a file" in err


def test_tokenizer_folder_is_readable_by_others_under_umask_022(tmp_path, corpus):
    # mkdtemp makes 0700 folders: a tokenizer renamed into place from one could not be loaded by the
    # other users who can read the rest of the run
    old = os.umask(0o022)
    try:
        assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    finally:
        os.umask(old)
    folder = tmp_path / "tok"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_data_get_out_pointing_at_a_file(tmp_path, corpus, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me\n")
    err = one_line_error(capsys, ["data", "get", str(corpus), "--out", str(target)])
    assert "is a file" in err and target.read_text() == "keep me\n"


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    (json.dumps({"step": 1, "loss": 2.0}).encode() + b"\n{\"step\": 2, \"loss\n", "line 2"),
    (b"[1, 2, 3]\n", "JSON object"),
])
def test_plot_on_a_damaged_metrics_file(tmp_path, capsys, content, says):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(content)
    err = one_line_error(capsys, ["plot", str(run), "--out", str(tmp_path / "runs.png")])
    assert "metrics.jsonl" in err and says in err


def test_data_get_out_keeps_what_else_is_in_the_folder(tmp_path, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(["data", "get", str(corpus), "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "train.txt").stat().st_size + (out / "val.txt").stat().st_size == corpus.stat().st_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("outputs") / "run", chat=False)


@pytest.fixture
def in_the_way(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    return blocker


@pytest.mark.parametrize("argv", [
    lambda run, out, tmp: ["attention", "--checkpoint", run, "--prompt", "ab", "--out", out / "map.png"],
    lambda run, out, tmp: ["plot", run, "--out", out / "runs.png"],
    lambda run, out, tmp: ["eval", "--checkpoint", run, "--task", tmp / "task.jsonl", "--out", out / "details.jsonl"],
    lambda run, out, tmp: ["rate", "--checkpoint", run, "--checkpoint", make_run(tmp / "other", chat=False),
                           "--prompts", tmp / "prompts.txt",
                           "--out", out / "ratings.csv"],
    lambda run, out, tmp: ["sweep", "--config", RECIPE, "--grid", "model.position=rope,alibi", "--steps", "1",
                           "--out", out / "sweep"],
], ids=["attention", "plot", "eval-task", "rate", "sweep"])
def test_outputs_under_a_file_are_one_line(run, in_the_way, tmp_path, capsys, monkeypatch, argv):
    (tmp_path / "task.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (tmp_path / "prompts.txt").write_text("ab\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 8, "loss": 3.0, "lr": 0.1}) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("q\n"))
    err = one_line_error(capsys, argv(run, in_the_way, tmp_path))
    assert str(in_the_way) in err and "is a file" in err
    assert in_the_way.read_text() == "not a folder\n"


def test_an_output_file_that_is_a_folder_is_one_line(run, tmp_path, capsys):
    folder = tmp_path / "map.png"
    folder.mkdir()
    err = one_line_error(capsys, ["attention", "--checkpoint", run, "--prompt", "ab", "--out", folder])
    assert "is a folder" in err


def test_dataset_cache_is_readable_by_others_under_umask_022(corpus, tmp_path):
    from scratchlm.data.sources import get_dataset

    old = os.umask(0o022)
    try:
        split = get_dataset(corpus, progress=False)
    finally:
        os.umask(old)
    for f in split.train.parent.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    from scratchlm.files import atomic_write_text

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now: the writer SIGKILL stopped mid-write
    orphan = tmp_path / f".progress.json.{gone.pid}.tmp"
    orphan.write_text("{half")
    alive = tmp_path / f".progress.json.{os.getppid()}.tmp"  # a writer still at work keeps its file
    alive.write_text("{half")
    atomic_write_text(tmp_path / "progress.json", "{}")
    assert not orphan.exists() and alive.exists() and (tmp_path / "progress.json").read_text() == "{}"
