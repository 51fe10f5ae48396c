"""The run folder as the training loop writes it: set up or reopened for a resume, and its metrics log.

See train/checkpoint.py for the layout. A resumed run starts from the newest checkpoint that is whole;
newer ones that are not (a file missing or cut short: a full disk, a copy interrupted) are said and
removed, since the resumed run writes those steps again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from scratchlm.config import RunConfig
from scratchlm.errors import UserError
from scratchlm.files import atomic_dir, atomic_write_text
from scratchlm.rundir import list_checkpoints
from scratchlm.train import distributed as dist
from scratchlm.train.checkpoint import incomplete
from scratchlm.train.loggers import Sinks


def open_run(out_dir: Path, cfg: RunConfig, tokenizer_dir: Path, d: dist.Dist) -> Path | None:
    """Create the run folder (the first process) and return the checkpoint to resume from, if any."""
    resume_from = _set_up(out_dir, cfg, tokenizer_dir) if d.main else None
    dist.barrier(d)
    if not d.main:   # the first process has removed any incomplete checkpoint by now
        resume_from = (list_checkpoints(out_dir) or [None])[-1]
    return resume_from


def _set_up(out_dir: Path, cfg: RunConfig, tokenizer_dir: Path) -> Path | None:
    if cfg.train.resume not in ("no", "auto"):
        raise UserError(f"train.resume = {cfg.train.resume!r} is not one of no, auto")
    existing = list_checkpoints(out_dir)
    if existing and cfg.train.resume != "auto":
        raise UserError(f"{out_dir} already holds a run; continue it with --resume or choose another --out")
    resume_from = _newest_whole(existing)
    if not (out_dir / "tokenizer").exists():
        copy_folder(tokenizer_dir, out_dir / "tokenizer")
    cfg.save(out_dir / "config.toml")
    return resume_from


def _newest_whole(checkpoints: list[Path]) -> Path | None:
    """The newest checkpoint with all its files whole; newer ones are said and removed."""
    checkpoints, broken = list(checkpoints), []
    while checkpoints and (why := incomplete(checkpoints[-1])) is not None:
        broken.append((checkpoints.pop(), why))
    if not broken:
        return checkpoints[-1] if checkpoints else None
    said = ", ".join(f"{c.name} ({why})" for c, why in broken)
    if not checkpoints:
        raise UserError(f"no checkpoint in {broken[0][0].parent} is whole: {said}; start the run again "
                        f"without --resume in another --out")
    print(f"note: resuming from {checkpoints[-1].name}, the newest whole checkpoint; removed {said}", flush=True)
    for c, _ in broken:
        shutil.rmtree(c)
    return checkpoints[-1]


def copy_folder(src: Path, dest: Path) -> None:
    """Copy the files of `src` into a new folder `dest`, atomically, with the permissions new files get
    here (copytree would keep the source's: a tokenizer saved in a 0700 temporary folder would stay
    unreadable to anyone else who loads the run)."""
    with atomic_dir(dest) as tmp:
        for path in sorted(Path(src).rglob("*")):
            target = tmp / path.relative_to(src)
            if path.is_dir():
                target.mkdir()
            else:
                shutil.copyfile(path, target)


class RunLog:
    """metrics.jsonl, appended one row at a time, and the other sinks (TensorBoard, W&B). On resume, rows
    past the checkpoint are dropped, so the file reads as one uninterrupted run. Only the first process
    writes: on the others, `write` does nothing."""

    def __init__(self, out_dir: Path, cfg: RunConfig, resumed_at: int | None, active: bool = True):
        self.file, self.sinks = None, None
        if not active:
            return
        self.sinks = Sinks(cfg.train.log_to, out_dir, cfg.to_dict(), resumed_at is not None)
        path = out_dir / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            rows = [line for line, row in _rows(path) if row.get("step", 0) <= resumed_at]
            atomic_write_text(path, "".join(r + "\n" for r in rows))
        elif resumed_at is None and path.exists():
            path.unlink()
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.sinks.write(row)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()
            self.sinks.close()


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each row in metrics.jsonl. A last line cut short (the run was killed while writing
    it) is dropped with a note; anything else that is not a JSON row is refused, naming the line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        elif n == len(lines) and not text.endswith("\n"):
            print(f"note: {path}: dropped its last line, cut short when the run stopped", flush=True)
        else:
            raise UserError(f"{path}, line {n}: not a metrics row; fix or delete that line, then resume again")
    return rows
