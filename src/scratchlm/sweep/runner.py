"""Running a sweep: one run folder per combination of the grid's values, `DIR/<name>/`.

A sweep can be stopped at any point and the same command run again: a run whose metrics end with the
final evaluation is skipped, an unfinished one resumes from its last checkpoint (`train.resume=auto`),
and the rest start. Runs go one after the other in this process; with several GPUs (or `--jobs N`) they
go as subprocesses, as many at a time as there are workers, each GPU seeing only its own device.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scratchlm.config import load_config, parse_override
from scratchlm.errors import UserError
from scratchlm.files import make_dir
from scratchlm.runtime import usable_cpus
from scratchlm.sweep.report import run_status, write_report

# Keys that may differ between a run's saved config and a rerun of its sweep without changing what it
# computes (vocab_size is filled in from the tokenizer; resume and threads are how, not what).
UNCOMPARED = {"model.vocab_size", "train.resume", "train.threads", "train.device", "train.log_to"}


@dataclass
class Combo:
    name: str
    values: dict[str, str]          # grid key -> value as written on the command line

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`section.key=v1,v2,...` per spec, each value checked later by the config loader."""
    grid, seen = [], set()
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--grid {spec!r}: expected section.key=value1,value2,...")
        key, raw = spec.split("=", 1)
        key = key.strip()
        parse_override(f"{key}=0")  # the key's shape, with the loader's message
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise UserError(f"--grid {spec!r}: no values after '='")
        if key in seen:
            raise UserError(f"--grid {key} is given twice; put all its values in one --grid")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {spec!r}: a value is listed twice")
        seen.add(key)
        grid.append((key, values))
    if not grid:
        raise UserError("give at least one --grid section.key=value1,value2,...")
    return grid


def _short(key: str, keys: list[str]) -> str:
    """The key's last part, unless another grid key ends the same way."""
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in keys) == 1 else key.replace(".", "-")


def combinations(grid: list[tuple[str, list[str]]]) -> list[Combo]:
    keys = [k for k, _ in grid]
    combos = []
    for values in itertools.product(*(vs for _, vs in grid)):
        parts = [f"{_short(k, keys)}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', v)}" for k, v in zip(keys, values)]
        combos.append(Combo("_".join(parts), dict(zip(keys, values))))
    names = [c.name for c in combos]
    if len(set(names)) != len(names):
        raise UserError("two combinations of the grid get the same folder name; use plainer values")
    return combos


def _flat(cfg) -> dict[str, object]:
    return {f"{section}.{k}": v for section, table in cfg.to_dict().items() for k, v in table.items()}


def _check_same(run_dir: Path, cfg) -> None:
    """A run folder made by another config would put a stranger's numbers in this sweep's table."""
    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        return
    saved, wanted = _flat(load_config(saved_path)), _flat(cfg)
    for key, value in wanted.items():
        if key not in UNCOMPARED and saved.get(key) != value:
            raise UserError(f"{run_dir} was trained with {key} = {saved.get(key)!r} but this sweep asks for {value!r}; "
                            f"use another --out, or delete {run_dir} to train it again")


def _budget(minutes: float | None, steps: int | None) -> list[str]:
    if minutes is not None and steps is not None:
        raise UserError("give --minutes or --steps, not both")
    if minutes is not None:
        if minutes <= 0:
            raise UserError(f"--minutes {minutes}: must be more than 0")
        return [f"train.minutes={minutes}", "train.max_steps=0"]
    if steps is not None:
        if steps <= 0:
            raise UserError(f"--steps {steps}: must be more than 0")
        return [f"train.max_steps={steps}", "train.minutes=0"]
    return []


def default_jobs() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def run_sweep(config: str | Path, grid_specs: list[str], out: str | Path, *, minutes: float | None = None,
              steps: int | None = None, sets: list[str] = (), contexts: list[int] = (), eval_tokens: int = 0,
              jobs: int | None = None, progress: bool = True, command: str = "") -> dict:
    """Train every combination not yet finished, then write the report. Returns the report's data."""
    out = Path(out)
    grid = parse_grid(grid_specs)
    combos = combinations(grid)
    common = [*sets, *_budget(minutes, steps), "train.resume=auto"]
    configs = {c.name: load_config(config, [*common, *c.overrides]) for c in combos}  # every mistake, before any run
    for c in combos:
        _check_same(out / c.name, configs[c.name])
    for cfg in configs.values():
        if not cfg.train.max_steps and not cfg.train.minutes:
            raise UserError(f"{config} sets neither train.max_steps nor train.minutes; give --steps N or --minutes M")
    make_dir(out)
    grid_keys = [k for k, _ in grid]

    def report(final: bool = True, extrapolate: bool = False) -> dict:
        return write_report(out, combos, grid_keys, contexts=contexts if extrapolate else (),
                            eval_tokens=eval_tokens, command=command, plot=final)

    todo = [c for c in combos if run_status(out / c.name) != "done"]
    done_before = len(combos) - len(todo)
    if done_before:
        print(f"{done_before} of {len(combos)} runs already finished in {out}; skipping them", flush=True)
    jobs = jobs or default_jobs()
    if todo:
        _prepare_data(configs[c.name] for c in todo)
    finished = False
    try:
        if jobs == 1:
            from scratchlm.train.pretrain import pretrain

            for i, c in enumerate(todo, 1):
                print(f"[sweep] run {i} of {len(todo)}: {c.name}", flush=True)
                result = pretrain(configs[c.name], out / c.name, progress)
                if result.get("interrupted"):
                    raise UserError(f"sweep stopped during {c.name}; run the same command again to continue")
                if i < len(todo):
                    report(final=False)  # the table can be read while the sweep goes on
        elif todo:
            _run_parallel(config, todo, common, out, jobs, sets)
        finished = True
    finally:
        # The plot is redrawn only when a run changed; extrapolation evals only when nobody waits to stop.
        data = report(final=bool(todo) or not (out / "sweep.png").exists(), extrapolate=finished)
    return data


def _prepare_data(configs) -> None:
    """Build each distinct tokenizer and shard folder once, before runs that would race to build it."""
    from scratchlm.data.prepare import prepare

    seen = set()
    for cfg in configs:
        key = repr(cfg.data)
        if key not in seen:
            seen.add(key)
            prepare(cfg.data)


def _run_parallel(config, todo: list[Combo], common: list[str], out: Path, jobs: int, sets) -> None:
    """`jobs` subprocesses at a time; on GPUs each gets CUDA_VISIBLE_DEVICES of its own slot."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = [] if gpus or any(s.startswith("train.threads=") for s in sets) else \
        [f"train.threads={max(1, usable_cpus() // jobs)}"]
    free, running, failed = list(range(jobs)), {}, []
    queue = list(todo)
    try:
        while queue or running:
            while queue and free:
                slot, c = free.pop(0), queue.pop(0)
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--config", str(config), "--out", str(out / c.name)]
                for o in [*common, *threads, *c.overrides]:
                    cmd += ["--set", o]
                log = open(out / f"{c.name}.log", "a")
                where = f"GPU {slot % gpus}" if gpus else f"worker {slot}"
                print(f"[sweep] {c.name} on {where} (log: {out / (c.name + '.log')})", flush=True)
                running[slot] = (c, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            time.sleep(0.5)
            for slot, (c, proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[slot]
                    free.append(slot)
                    if proc.returncode != 0 or run_status(out / c.name) != "done":
                        failed.append(c.name)
                        print(f"[sweep] {c.name} ended without finishing (exit {proc.returncode}); "
                              f"see {out / (c.name + '.log')}", flush=True)
                    else:
                        print(f"[sweep] {c.name} finished", flush=True)
    except KeyboardInterrupt:
        # The children got the same Ctrl-C: each saves a checkpoint and stops; wait for that.
        for c, proc, log in running.values():
            proc.wait()
            log.close()
        raise UserError("sweep stopped; run the same command again to continue") from None
    if failed:
        raise UserError(f"{len(failed)} run(s) did not finish ({', '.join(failed)}); see their logs in {out}, "
                        f"then run the same command again to continue them")
