"""The command line: a user's mistake gets one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import one_line_error

from scratchlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "shakespeare-cpu.toml")


pytestmark = pytest.mark.usefixtures("offline_cache")




def test_missing_files(capsys, tmp_path):
    assert "config file not found: nope.toml" in one_line_error(capsys, ["pretrain", "--config", "nope.toml"])
    err = one_line_error(capsys, ["tokenizer", "train", "--input", str(tmp_path / "gone.txt"), "--vocab-size", "300",
                                  "--out", str(tmp_path / "tok")])
    assert "gone.txt" in err
    err = one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "no-run"), "--prompt", "x"])
    assert "no-run" in err
    err = one_line_error(capsys, ["tokenizer", "encode", "--tokenizer", str(tmp_path / "no-tok"), "--input", "x",
                                  "--out", str(tmp_path / "s")])
    assert "no-tok" in err


def test_unknown_dataset_names_the_nearest(capsys):
    err = one_line_error(capsys, ["data", "get", "shakespear"])
    assert "shakespear" in err and "shakespeare" in err


def test_unknown_set_key_names_the_nearest(capsys):
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--set", "train.warmup=10"])
    assert "train.warmup" in err and "warmup_steps" in err
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--set", "trian.lr=1"])
    assert "did you mean train" in err


def test_bad_values(capsys, tmp_path):
    err = one_line_error(capsys, ["pretrain", "--config", RECIPE, "--set", "train.lr=fast"])
    assert "train.lr must be float" in err and "'fast'" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 3e-3\nmicro_batch = \n")
    err = one_line_error(capsys, ["pretrain", "--config", str(bad)])
    assert "bad.toml" in err and "invalid TOML" in err and "line 3" in err
    bad.write_text('[model]\nposition = "rotary"\n')
    assert "model.position = 'rotary' is not one of" in one_line_error(capsys, ["pretrain", "--config", str(bad)])


def test_hf_offline(capsys):
    pytest.importorskip("datasets")
    err = one_line_error(capsys, ["data", "get", "hf:nobody/nothing-here"])
    assert "hf:nobody/nothing-here" in err and "no internet" in err


def test_console_script_exit_code_and_help(tmp_path):
    env = {**os.environ, "SCRATCHLM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "scratchlm", "data", "get", "no-such-set"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    out = subprocess.run([sys.executable, "-m", "scratchlm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "data", "tokenizer", "pretrain", "generate", "eval", "plot", "model"):
        assert command in out.stdout


def test_data_list_names_sizes_and_licences(capsys):
    assert main(["data", "list"]) == 0
    table = capsys.readouterr().out
    for name in ("shakespeare", "chatterbot", "chitchat"):
        assert name in table
    assert "licen" in table.lower()


def test_model_info_of_a_recipe_counts_the_vocabulary_it_trains(capsys):
    # the demo recipe trains a 2048-token tokenizer, and pretrain sizes the model to it
    assert main(["model", "info", "--config", RECIPE]) == 0
    out = capsys.readouterr().out
    assert "vocab 2048" in out and "1,115,264" in out
