"""Writing files and folders so that a reader never sees half of one (and reading JSON lines back).

Everything a stage leaves on disk (configs, tokenizers, datasets, exports, plots) goes through these:
the content is written under a temporary name in the same directory, flushed to disk, then renamed into
place, which the filesystem does atomically. A crash, Ctrl-C or SIGKILL leaves the old file or none.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from scratchlm.errors import UserError


def read_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSONL file; a line that is not JSON, or a file that
    is not UTF-8, is one UserError naming `path:line`."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{n}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`, None when there is no such file, or UserError (one line naming the file)
    when it cannot be read or holds something other than an object."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object")
    return doc


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a rename is only as durable as its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever was written there is renamed onto `path`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: name a file to write")
    make_dir(path.parent)
    # the pid keeps two processes writing the same file from sharing (and truncating) one temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove_orphans(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        give_usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_orphans(path: Path) -> None:
    """Delete the temp files of `path` that a killed writer left (SIGKILL gives no chance to clean up);
    a writer still alive keeps its own."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy a file of any size (streamed, not read whole) so that `dst` is either the old file or a
    complete copy."""
    with _replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def give_usual_mode(path: Path) -> None:
    """The permissions open() or mkdir() would have given `path` (0666 or 0777 less the umask), for what
    mkstemp or mkdtemp made private (0600, 0700) and is about to be renamed into place for others to read."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def make_dir(path: Path) -> None:
    """mkdir -p that names the culprit when a file stands where a folder should be."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent} is a file, not a folder: choose another path")
    path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; when the block ends without an error, it becomes
    `dest`. With `replace`, an existing `dest` is swapped out (removed only once the new one is in place
    beside it); without, an existing non-empty `dest` is refused before anything is written.

    The folder gets the permissions a plain mkdir would (0777 minus the umask), not mkdtemp's 0700, so a
    run another user may read is loadable by them too."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file, not a folder: choose another path")
    if not replace and dest.is_dir() and any(dest.iterdir()):
        raise UserError(f"{dest} already exists and is not empty: choose another path or pass --force")
    make_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        give_usual_mode(tmp)
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
