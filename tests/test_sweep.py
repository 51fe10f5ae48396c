"""`scratchlm sweep`: the grid, a sweep interrupted and run again (finished runs skipped, the unfinished one
resumed to the same losses), and a table that says what the runs' own metrics files say."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINIER

from scratchlm.cli import main
from scratchlm.config import load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.sweep import combinations, parse_grid, run_sweep
from scratchlm import rundir

RECIPE = str(recipe_path("shakespeare-cpu.toml"))
TINY = [*TINIER, "train.eval_every=3", "train.eval_tokens=128", "train.checkpoint_every=2", "train.keep_checkpoints=5",
        "train.keep_best=false"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    # Tiny models' matrix products are too small to share out; on a busy machine two threads mostly wait.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(run):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds", "mfu")} for r in rows(run)]


def table(sweep_md):
    """The main table of sweep.md as dicts, header cells as keys."""
    lines = [line for line in sweep_md.read_text().split("## Length")[0].splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_grid_and_names():
    grid = parse_grid(["model.position=rope,alibi", "train.lr=1e-3, 3e-3"])
    assert grid == [("model.position", ["rope", "alibi"]), ("train.lr", ["1e-3", "3e-3"])]
    combos = combinations(grid)
    assert [c.name for c in combos] == ["position-rope_lr-1e-3", "position-rope_lr-3e-3",
                                        "position-alibi_lr-1e-3", "position-alibi_lr-3e-3"]
    assert combos[1].overrides == ["model.position=rope", "train.lr=3e-3"]
    # Two keys ending alike keep their sections in the names.
    assert combinations(parse_grid(["model.dropout=0,0.1", "train.seed=1"]))[1].name == "dropout-0.1_seed-1"
    for bad, message in [("model.position", "expected section.key=value1"), ("model.position=", "no values"),
                         ("position=rope", "section.key=value"), ("model.mlp=gelu,gelu", "listed twice")]:
        with pytest.raises(UserError, match=message):
            parse_grid([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_grid(["model.mlp=gelu", "model.mlp=relu"])


def test_every_combination_is_checked_before_any_run(play_text, tmp_path):
    with pytest.raises(UserError, match="model.position = 'rotary' is not one of"):
        run_sweep(RECIPE, ["model.position=rope,rotary"], tmp_path / "sweep", steps=2,
                  sets=[f"data.dataset={play_text}", *TINY])
    assert not (tmp_path / "sweep").exists()
    # A folder left by another config would put its numbers in this sweep's table.
    cfg = load_config(RECIPE, [f"data.dataset={play_text}", *TINY, "train.max_steps=3", "train.minutes=0",
                               "model.position=rope", "train.lr=0.1"])
    (tmp_path / "sweep" / "position-rope").mkdir(parents=True)
    cfg.save(tmp_path / "sweep" / "position-rope" / "config.toml")
    with pytest.raises(UserError, match=r"position-rope was trained with train.lr = 0.1 but this sweep asks for 0.003"):
        run_sweep(RECIPE, ["model.position=rope"], tmp_path / "sweep", steps=3, sets=[f"data.dataset={play_text}", *TINY])


def test_rerun_trains_only_unfinished_runs_and_tables_their_metrics(play_text, tmp_path, monkeypatch):
    """The bookkeeping alone, on metrics files written by hand and a stand-in for training."""
    from scratchlm.sweep import runner
    from scratchlm.train import pretrain as stage

    out, sets = tmp_path / "sweep", [f"data.dataset={play_text}", *TINY]
    done = [{"step": 10, "tokens": 640, "loss": 3.0, "lr": 1e-3, "seconds": 2.0},
            {"step": 10, "tokens": 640, "val_loss": 2.71828, "val_ppl": 15.15, "val_bpb": 1.23456, "final": True}]
    partial = [{"step": 5, "tokens": 320, "loss": 3.5, "lr": 1e-3, "seconds": 1.0},
               {"step": 5, "tokens": 320, "val_loss": 3.25, "val_ppl": 25.8, "val_bpb": 1.5}]
    for name, log in (("mlp-gelu", done), ("mlp-relu", partial)):
        (out / name).mkdir(parents=True)
        load_config(RECIPE, [*sets, "train.max_steps=10", "train.minutes=0", "train.resume=auto",
                             f"model.mlp={name[4:]}"]).save(out / name / "config.toml")
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    trained = []

    def fake_pretrain(cfg, run_dir, progress=True):
        trained.append((run_dir.name, cfg.train.resume, cfg.train.max_steps))
        run_dir.mkdir(exist_ok=True)
        cfg.save(run_dir / "config.toml")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
        return {}

    monkeypatch.setattr(stage, "pretrain", fake_pretrain)
    monkeypatch.setattr(runner, "_prepare_data", lambda configs: None)
    data = run_sweep(RECIPE, ["model.mlp=gelu,relu,silu"], out, steps=10, sets=sets, progress=False)
    assert trained == [("mlp-relu", "auto", 10), ("mlp-silu", "auto", 10)]
    shown = table(out / "sweep.md")
    assert [r["run"] for r in shown] == ["mlp-gelu", "mlp-relu", "mlp-silu"]
    assert shown[0] == {"run": "mlp-gelu", "model.mlp": "gelu", "params": shown[0]["params"], "tokens seen": "640",
                        "val loss": "2.7183", "val bpb": "1.2346", "tokens/s": "320", "train time": "2.0s",
                        "status": "done"}
    assert int(shown[0]["params"].replace(",", "")) == data["runs"][0]["params"] > 0
    assert (out / "sweep.png").stat().st_size > 10_000

    trained.clear()
    run_sweep(RECIPE, ["model.mlp=gelu,relu,silu"], out, steps=10, sets=sets, progress=False)
    assert trained == []


@pytest.mark.slow
def test_interrupted_sweep_skips_finished_runs_and_resumes_the_rest(play_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", RECIPE, "--grid", "model.position=learned,rope,alibi", "--steps", "6",
            "--out", str(out), "--set", f"data.dataset={play_text}", *[x for s in TINY for x in ("--set", s)]]
    assert main(argv) == 0
    names = ["position-learned", "position-rope", "position-alibi"]
    straight = {n: untimed(out / n) for n in names}
    first_bytes = (out / names[0] / "metrics.jsonl").read_bytes()

    # Now as if the machine died during the second run, some time after its step-4 checkpoint, before the
    # third began: later checkpoints never happened, metrics.jsonl holds rows past the checkpoint.
    run2 = out / names[1]
    for later in rundir.list_checkpoints(run2)[2:]:
        shutil.rmtree(later)
    kept = [r for r in rows(run2) if r["step"] <= 5 and not r.get("final")]
    (run2 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    shutil.rmtree(out / names[2])

    from scratchlm.train import pretrain as stage

    trained, real = [], stage.pretrain
    monkeypatch.setattr(stage, "pretrain", lambda cfg, run_dir, progress=True: trained.append(run_dir.name) or
                        real(cfg, run_dir, progress))
    capsys.readouterr()
    assert main(argv + ["--context", "16,32"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 3 runs already finished" in printed and f"resuming {run2}" in printed
    assert trained == names[1:]
    assert (out / names[0] / "metrics.jsonl").read_bytes() == first_bytes
    assert {n: untimed(out / n) for n in names} == straight   # the resumed run repeats the same losses

    # The table says what each run's metrics file says.
    shown = {r["run"]: r for r in table(out / "sweep.md")}
    assert list(shown) == names
    for n in names:
        log = rows(out / n)
        final, last_step = log[-1], [r for r in log if "loss" in r][-1]
        assert final["final"] and shown[n]["status"] == "done" and shown[n]["model.position"] == n.split("-")[1]
        assert shown[n]["val loss"] == f"{final['val_loss']:.4f}" and shown[n]["val bpb"] == f"{final['val_bpb']:.4f}"
        assert shown[n]["tokens seen"] == f"{final['tokens']:,}" == f"{6 * 4 * 16:,}"
        assert shown[n]["tokens/s"] == f"{last_step['tokens'] / last_step['seconds']:,.0f}"
    data = json.loads((out / "sweep.json").read_text())
    assert [r["val_bpb"] for r in data["runs"]] == [rows(out / n)[-1]["val_bpb"] for n in names]
    assert (out / "sweep.png").stat().st_size > 10_000

    # Extrapolation: learned positions stop at their table; at its own context a run scores what its
    # final evaluation did.
    md = (out / "sweep.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| position-learned | ") and "n/a" in line)
    own, beyond = [c.strip() for c in row.strip("| ").split("|")][1:3]
    # re-evaluated after loading, so equal to the final evaluation up to float summation order (4 decimals shown)
    assert float(own) == pytest.approx(rows(out / names[0])[-1]["val_bpb"], abs=1e-4)
    assert beyond == "n/a: learned, max 16"
    ext = data["runs"][1]["extrapolation"]
    assert ext["16"]["val_bpb"] == pytest.approx(rows(out / names[1])[-1]["val_bpb"], rel=1e-5)
    assert ext["32"]["val_tokens"] == ext["16"]["val_tokens"]

    # A third time: nothing left to train.
    trained.clear()
    assert main(argv) == 0 and trained == []


@pytest.mark.slow
def test_sweep_in_subprocesses(play_text, tmp_path):
    out = tmp_path / "sweep"
    data = run_sweep(RECIPE, ["model.mlp=gelu,relu"], out, steps=3, jobs=2,
                     sets=[f"data.dataset={play_text}", *TINY, "train.threads=1"])
    assert [r["status"] for r in data["runs"]] == ["done", "done"]
    assert (out / "mlp-gelu.log").is_file() and (out / "sweep.png").is_file()
    assert [r["tokens"] for r in data["runs"]] == [3 * 4 * 16] * 2
