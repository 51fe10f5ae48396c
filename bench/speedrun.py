"""The Shakespeare CPU speedrun: validation bits per byte after a fixed wall-clock budget of training.

    python bench/speedrun.py                      # the demo recipe, 5 minutes
    python bench/speedrun.py --set train.lr=4e-3  # any override, as in `scratchlm pretrain`
    python bench/speedrun.py --seeds 3 --json runs.jsonl --compare records/0000-demo.md
    python bench/speedrun.py --seeds 3 --steps 1000 --json runs.jsonl   # the same at equal steps

Tokenizer training and shard encoding happen first and are timed apart: the budget is training steps
only (the schedule is sized to it; see train/budget.py). The final evaluation reads the whole validation
split. For scale: a well-known minimal character-level GPT reaches about 2.5 bits per byte in 5 minutes
on the same 2-core machine (figure from the issue, not measured here).

--seeds N trains N runs, train.seed = the config's seed and the N-1 after it, on one tokenizer. This
machine's speed moves 10-40% between minutes, so the CPU and its float32 and bf16 matmul rates are
measured before the first run and after the last. --compare tests whether the mean is lower than a
record's (records/README.md has the rule); bench/records.py writes an entry from the --json file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_check import machine
from records import ALPHA, compare, describe_test, load_runs, pick, record_verdict, spread

from scratchlm.config import load_config, recipe_path
from scratchlm.data.prepare import train_tokenizer
from scratchlm.data.sources import get_dataset
from scratchlm.errors import UserError
from scratchlm.train.mfu import matmul_flops
from scratchlm.train.pretrain import pretrain

PEER_BPB = 2.5  # minimal char-level GPT, 5 minutes, this machine (quoted)
ROOT = Path(__file__).resolve().parents[1]


def matmul_rates() -> dict[str, float]:
    """GFLOP/s of a 2048^3 product in float32 and in bfloat16 on this process's threads."""
    return {"fp32": matmul_flops() / 1e9, "bf16": matmul_flops(dtype=torch.bfloat16) / 1e9}


def commit() -> str:
    """The checkout's short commit, with "-dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if git("status", "--porcelain",
                                                                                "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_args(a: argparse.Namespace) -> None:
    if a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: give the number of runs, 1 or more (3 for a record)")
    if a.steps is not None and a.steps < 1:
        raise UserError(f"--steps {a.steps}: give a number of training steps, 1 or more")
    if a.steps is not None and a.minutes is not None:
        raise UserError(f"--minutes {a.minutes} --steps {a.steps}: give one budget, minutes or steps")
    if a.steps is None and not a.minutes > 0:
        raise UserError(f"--minutes {a.minutes}: give a training budget in minutes > 0, e.g. --minutes 5")
    if not 0 < a.alpha < 1:
        raise UserError(f"--alpha {a.alpha}: give a significance level between 0 and 1, e.g. 0.05")
    if a.compare and a.seeds < 2:
        raise UserError("--compare needs --seeds 2 or more: a t-test needs the spread of this side too")
    for text in a.set:
        if text.split("=", 1)[0].strip() in ("train.minutes", "train.max_steps"):
            raise UserError(f"--set {text}: the budget is --minutes or --steps here")
    if a.out and Path(a.out).exists() and any(Path(a.out).iterdir()):
        raise UserError(f"--out {a.out}: not empty; a speedrun trains from scratch, so give a new folder")


def speedrun(a: argparse.Namespace) -> int:
    if a.steps is None and a.minutes is None:
        a.minutes = 5.0
    check_args(a)
    mode, budget = ("steps", a.steps) if a.steps else ("time", a.minutes)
    sets = [*a.set, *([f"train.max_steps={a.steps}", "train.minutes=0"] if a.steps else [f"train.minutes={a.minutes}"])]
    cfg = load_config(a.config, ["train.eval_every=0", *sets])
    record = None
    if a.compare:
        record = pick(load_runs(Path(a.compare)), a.compare, mode, budget)
        if len(record["rows"]) < 2:
            raise UserError(f"{a.compare}: its run at this budget has one seed; a t-test needs two or more")
    info = {**machine("cpu"), "threads": torch.get_num_threads()}
    print(f"CPU {info['cpu']}, {info['cpus']} cores, {info['threads']} threads; flags "
          f"{' '.join(info['cpu_flags']) or 'none of note'}; torch {info['torch']}")
    rates = {"start": matmul_rates()}
    print(f"matmul GFLOP/s at the start: fp32 {rates['start']['fp32']:.1f}, bf16 {rates['start']['bf16']:.1f}")
    date = datetime.datetime.now().isoformat(timespec="seconds")
    run_id, version = f"{date}-{os.getpid()}", commit()
    split = get_dataset(cfg.data.dataset)
    rows = []
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        if not cfg.data.tokenizer:
            train_tokenizer([split.train], cfg.data.vocab_size, cfg.data.special_tokens, work / "tokenizer",
                            cfg.data.uncased)
            cfg.data.tokenizer = str(work / "tokenizer")
        tokenizer_seconds = time.perf_counter() - start
        for seed in range(cfg.train.seed, cfg.train.seed + a.seeds):
            seeded = copy.deepcopy(cfg)
            seeded.train.seed = seed
            result = pretrain(seeded, (Path(a.out) if a.out else work) / f"seed-{seed}")
            if result.get("interrupted"):
                print(f"speedrun stopped by signal {result['signal']} during seed {seed}", file=sys.stderr)
                return 128 + result["signal"]
            row = {"kind": "seed", "run": run_id, "seed": seed, "mode": mode, "budget": budget,
                   "val_bpb": result["val_bpb"], "val_loss": result["val_loss"], "steps": result["step"],
                   "tokens": result["tokens"], "train_seconds": result["train_seconds"]}
            rows.append(row)
            print(f"\nseed {seed}: val bits per byte {row['val_bpb']:.4f} after {row['train_seconds']:.0f} s of "
                  f"training ({row['steps']} steps, {row['tokens']:,} tokens)")
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rates["end"] = matmul_rates()
    values = [r["val_bpb"] for r in rows]
    mean, sd = spread(values)
    summary = {"kind": "summary", "run": run_id, "mode": mode, "budget": budget, "seeds": [r["seed"] for r in rows],
               "n": len(rows), "val_bpb_mean": mean, "val_bpb_sd": sd, "date": date, "commit": version,
               "overrides": a.set, "config": cfg.to_dict(), "machine": info, "matmul_gflops": rates,
               "tokenizer_seconds": tokenizer_seconds}
    print(f"\n{'seed':>6}{'val bpb':>9}{'steps':>7}{'tokens':>12}{'train s':>9}")
    for r in rows:
        print(f"{r['seed']:>6}{r['val_bpb']:>9.4f}{r['steps']:>7}{r['tokens']:>12,}{r['train_seconds']:>9.1f}")
    print(f"speedrun at {budget} {'steps' if a.steps else 'minutes'}: mean val bits per byte {mean:.4f}, sample "
          f"standard deviation {'n/a (one run)' if sd is None else f'{sd:.4f}'}, {len(rows)} runs; tokenizer "
          f"{tokenizer_seconds:.1f} s (excluded)")
    print(f"matmul GFLOP/s at the end: fp32 {rates['end']['fp32']:.1f}, bf16 {rates['end']['bf16']:.1f}")
    print(f"peer (minimal char-level GPT, quoted): {PEER_BPB} bits per byte; ratio peer/ours {PEER_BPB / mean:.2f}x")
    if record is not None:
        try:
            summary["compare"] = {"against": str(a.compare), **compare(values, [r["val_bpb"] for r in record["rows"]],
                                                                        a.alpha)}
            c = summary["compare"]
            judged = f"; {record_verdict(c)} (records/README.md)" if mode == "time" else ""
            print(f"against {a.compare} (one-sided Welch t-test, this mean lower): {describe_test(c)}{judged}")
        except ValueError as e:  # both sides constant: nothing to test
            print(f"against {a.compare}: no t-test ({e})")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(recipe_path("shakespeare-cpu.toml")))
    p.add_argument("--minutes", type=float, help="training budget per run (default 5)")
    p.add_argument("--steps", type=int, help="train this many steps per run instead of --minutes")
    p.add_argument("--seeds", type=int, default=1, help="runs, one per seed from the config's train.seed on")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", help="folder for the runs, one seed-N folder each (default: a temporary one)")
    p.add_argument("--json", help="append one JSON line per seed and a summary line to this file")
    p.add_argument("--compare", help="a records/ entry or --json file: is this mean lower than its mean?")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"the test's threshold (default {ALPHA})")
    a = p.parse_args()
    try:
        return speedrun(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
