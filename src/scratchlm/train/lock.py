"""One writer per run folder.

Two runs writing into the same folder interleave their metrics rows, checkpoints and config.toml, and the
run folder then describes neither. The stage that writes a run folder (pretrain, sft) holds `RunLock` on
it for as long as it writes: an advisory lock (flock) on `.lock`, a file holding the writer's pid so that
a refused run can say who holds it.

The kernel drops the lock when its process ends however it ends, SIGKILL included, so a lock left by a
dead process is free to take; its pid, still in the file, is named in a notice. POSIX only.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.files import make_dir

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.made = False

    def __enter__(self) -> RunLock:
        self.made = not self.path.parent.exists()
        make_dir(self.path.parent)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _pid_in(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise UserError(f"{self.path.parent} is being written by another run ({who}); wait for it to "
                                f"end or choose another --out") from None
            if not _same_file(fd, self.path):
                os.close(fd)   # its holder removed it between our open and our lock: take the new one
                continue
            self.fd = fd
        left = _pid_in(self.fd)
        if left and left != os.getpid():
            print(f"note: {self.path} names pid {left}, which no longer holds it (the run was killed); "
                  f"taking the run folder over", flush=True)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        # removed while still held, so that nobody locks the file a moment before it disappears
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.made:   # a run that stopped before writing anything (a mistake in its settings) leaves no folder
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
