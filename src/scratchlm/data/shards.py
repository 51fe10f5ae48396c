"""Corpus -> token shards: flat little-endian arrays of token ids on disk, read back memory-mapped.

A shard folder holds `train_0000.bin`, `val_0000.bin`, ... and `meta.json` (dtype, token and byte counts
per split, how documents are separated, and a fingerprint of the tokenizer so shards are never read with
the wrong one). `meta.json` is written last: a folder that has it is complete.

Documents (see `sources.document_starts`) are encoded separately, so no token spans two of them, with the
tokenizer's `<eos>` id between consecutive ones when it has that token. Within a document the ids are
exactly those of encoding its whole text at once.

Encoding is parallel: the text is cut into pieces (a 32nd of the split, within 0.5-8 MB) at places where a
cut cannot change the tokens (document starts, and `pretokenize.find_cut_bytes` places inside documents), worker processes
encode the pieces, and the main process appends their ids, in order, to the shard files. After each piece
`.progress.json` records how far the shards are written; a run that is interrupted and started again with
the same inputs cuts the shard being written back to the last recorded piece and goes on from there.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scratchlm.data.sources import DOCS_SUFFIX, document_starts
from scratchlm.errors import UserError
from scratchlm.runtime import usable_cpus
from scratchlm.files import atomic_write_text

SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per file
PIECE_MIN, PIECE_MAX = 1 << 19, 8 << 20  # bytes of text per unit of parallel work
PROGRESS = ".progress.json"
FORMAT_VERSION = 2  # bump when the same inputs would give other shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# How a tokenizer was trained (its sample, time and memory: data/prepare.py) says nothing of how it encodes.
NOT_FINGERPRINTED = ("training.json",)


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A hash of the files that make the tokenizer: the same tokenizer trained twice has the same one."""
    h = hashlib.sha256()
    for f in sorted(Path(tokenizer_dir).glob("*")):
        if f.is_file() and f.name not in NOT_FINGERPRINTED:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Piece:
    """Bytes `[start, end)` of `path`; an `<eos>` goes before each offset in `eos_before` (document starts
    other than the split's first), and the text is also cut at `doc_starts` so documents encode alone."""
    path: str
    start: int
    end: int
    doc_starts: tuple[int, ...]
    eos_before: tuple[int, ...]


def piece_bytes_for(total: int) -> int:
    """Piece size from the split's size alone (never from the worker count), so a rerun with other
    settings plans the same pieces and can resume."""
    return int(min(max(total // 32, PIECE_MIN), PIECE_MAX))


def plan_pieces(paths: list[Path], piece_bytes: int, specials: list[str], eos: bool = True) -> tuple[list[Piece], int]:
    """The split's pieces, in order, and its number of documents. `eos`: whether to separate documents."""
    from scratchlm.tokenizer.bpe import chunk_ranges

    pieces, n_docs = [], 0
    for path in paths:
        if path.stat().st_size == 0:
            continue
        starts = document_starts(path)
        marked = (starts if n_docs else starts[1:]) if eos else []
        n_docs += len(starts)
        for a, b in chunk_ranges(str(path), piece_bytes, specials):
            inside = tuple(s for s in starts if a <= s < b)
            pieces.append(Piece(str(path), a, b, inside, tuple(s for s in marked if a <= s < b)))
    return pieces, n_docs


# ----------------------------------------------------------------------------- encoding a piece
_WORKER: dict = {}


def _init_worker(blob: bytes, dtype: str) -> None:
    _WORKER["tok"], _WORKER["dtype"] = pickle.loads(blob), np.dtype(dtype)


def _encode_piece(piece: Piece) -> np.ndarray:
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    bounds = sorted({piece.start, *piece.doc_starts, piece.end})
    out: list[np.ndarray] = []
    for a, b in zip(bounds, bounds[1:]):
        if a in piece.eos_before and tok.eos_id is not None:
            out.append(np.array([tok.eos_id], dtype=dtype))
        # Cuts fall on document starts or before ASCII white space, never inside a UTF-8 sequence, so
        # decoding segment by segment (bad bytes read as U+FFFD) equals decoding the whole.
        text = data[a - piece.start:b - piece.start].decode("utf-8", errors="replace")
        out.append(np.asarray(tok.encode(text), dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _results(pieces: list[Piece], tokenizer, dtype: np.dtype, workers: int):
    """Each piece's ids, in order; encoded in worker processes, at most a few pieces ahead of the writer."""
    blob = pickle.dumps(tokenizer)
    if workers <= 1 or len(pieces) <= 1:
        _init_worker(blob, dtype.str)
        yield from map(_encode_piece, pieces)
        return
    # fork where there is one, as in the trainer: spawn re-runs the caller's main module in each worker.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(min(workers, len(pieces)), initializer=_init_worker, initargs=(blob, dtype.str))
    try:
        todo, pending = iter(pieces), collections.deque()
        for piece in todo:
            pending.append(pool.apply_async(_encode_piece, (piece,)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            ids = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_encode_piece, (nxt,)))
            yield ids
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- writing shards
def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _resume_file(out_dir: Path, state: dict, itemsize: int):
    """The open shard being written, cut back to what `state` records; None if that cannot be had."""
    current, final = out_dir / f".{state['files'][-1]}.tmp", out_dir / state["files"][-1]
    if not current.exists() and final.exists():
        os.replace(final, current)  # stopped between finishing a shard and recording it
    want = state["fill"] * itemsize
    if not current.exists() or current.stat().st_size < want:
        return None
    handle = open(current, "r+b")
    handle.truncate(want)  # what a piece wrote after the last recorded one
    handle.seek(0, os.SEEK_END)
    return handle


def encode_split(tokenizer, paths: list[Path], out_dir: Path, split: str, progress: bool = True, *,
                 workers: int | None = None, state: dict | None = None, save_state=None,
                 piece_bytes: int | None = None) -> dict:
    """Encode text files into `<split>_NNNN.bin` shards; returns the split's entry for meta.json.

    `state` (this split's entry of `.progress.json`, updated in place) and `save_state` (called after
    each piece) make the work resumable; `encode_corpus` passes both.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise UserError(f"input file not found: {p}")
    total_bytes = sum(p.stat().st_size for p in paths)
    pieces, n_docs = plan_pieces(paths, piece_bytes or piece_bytes_for(total_bytes), list(tokenizer.special_tokens),
                                 eos=tokenizer.eos_id is not None)
    state = {} if state is None else state
    handle = _resume_file(out_dir, state, dtype.itemsize) if state else None
    if handle is None:
        state.update(pieces=0, files=[f"{split}_0000.bin"], fill=0, tokens=0)
        handle = open(out_dir / f".{split}_0000.bin.tmp", "wb")
    workers = workers or usable_cpus()
    done = state["pieces"]
    bar = tqdm(total=total_bytes, initial=sum(p.end - p.start for p in pieces[:done]), unit="B", unit_scale=True,
               desc=f"encode {split}", disable=not progress, file=sys.stderr)
    results = _results(pieces[done:], tokenizer, dtype, workers)
    try:
        for piece, ids in zip(pieces[done:], results):
            while len(ids):
                room = SHARD_TOKENS - state["fill"]
                handle.write(ids[:room].tobytes())
                state["fill"] += min(room, len(ids))
                state["tokens"] += min(room, len(ids))
                ids = ids[room:]
                if state["fill"] == SHARD_TOKENS:
                    _sync(handle)
                    handle.close()
                    os.replace(out_dir / f".{state['files'][-1]}.tmp", out_dir / state["files"][-1])
                    state["files"].append(f"{split}_{len(state['files']):04d}.bin")
                    state["fill"] = 0
                    handle = open(out_dir / f".{state['files'][-1]}.tmp", "wb")
            _sync(handle)
            state["pieces"] += 1
            if save_state:
                save_state()
            bar.update(piece.end - piece.start)
    finally:
        results.close()  # stops the worker pool now, also when interrupted
        bar.close()
        handle.close()
    os.replace(out_dir / f".{state['files'][-1]}.tmp", out_dir / state["files"][-1])
    return {"files": list(state["files"]), "tokens": state["tokens"], "bytes": total_bytes, "documents": n_docs}


def _plan_key(tokenizer, tokenizer_dir: Path, splits: dict[str, list[Path]]) -> str:
    inputs = {}
    for split, paths in splits.items():
        rows = []
        for p in map(Path, paths):
            st = p.stat() if p.is_file() else None
            docs = p.with_suffix(DOCS_SUFFIX)
            rows.append([str(p.resolve()), st and st.st_size, st and st.st_mtime_ns,
                         docs.stat().st_mtime_ns if docs.is_file() else None])
        inputs[split] = rows
    key = [FORMAT_VERSION, tokenizer_fingerprint(tokenizer_dir), tokenizer.vocab_size, SHARD_TOKENS,
           PIECE_MIN, PIECE_MAX, inputs]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def encode_corpus(tokenizer, tokenizer_dir: Path, splits: dict[str, list[Path]], out_dir: Path,
                  progress: bool = True, workers: int | None = None) -> dict:
    """Encode every split and write meta.json last, so a folder with meta.json is complete. Run again
    with the same inputs, it continues an interrupted run, or does nothing if the folder is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan_key(tokenizer, tokenizer_dir, splits)
    meta_path, progress_path = out_dir / "meta.json", out_dir / PROGRESS
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        if old.get("plan") == plan:
            return old
        meta_path.unlink()  # from other inputs: the folder is incomplete until this run ends
    try:
        saved = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    except ValueError:
        saved = {}
    if saved.get("plan") != plan:
        for split in splits:  # shards of an earlier, different run would linger unlisted
            for f in [*out_dir.glob(f"{split}_[0-9]*.bin"), *out_dir.glob(f".{split}_[0-9]*.bin.tmp")]:
                f.unlink()
        saved = {"plan": plan, "splits": {}}

    def save_state():
        atomic_write_text(progress_path, json.dumps(saved))

    eos = tokenizer.eos_id
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": tokenizer_fingerprint(tokenizer_dir), "plan": plan,
            "documents": ({"separator": "eos", "eos_id": eos, "note": "<eos> between consecutive documents"}
                          if eos is not None else
                          {"separator": "none", "eos_id": None,
                           "note": "the tokenizer has no <eos>; documents are encoded apart but not marked"}),
            "splits": {}}
    for split, paths in splits.items():
        state = saved["splits"].setdefault(split, {})
        meta["splits"][split] = encode_split(tokenizer, paths, out_dir, split, progress, workers=workers,
                                             state=state, save_state=save_state)
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    progress_path.unlink(missing_ok=True)
    return meta


def encode_sources(tokenizer_dir: Path, sources: list[str], out_dir: Path, workers: int | None = None,
                   progress: bool = True) -> dict:
    """`scratchlm tokenizer encode`: datasets (names, paths, `hf:` specs) into train and val shards."""
    from scratchlm.data.sources import get_dataset
    from scratchlm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(tokenizer_dir))
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    for source in sources:
        split = get_dataset(source, progress=progress)
        splits["train"].append(split.train)
        splits["val"].append(split.val)
    return encode_corpus(tok, Path(tokenizer_dir), splits, Path(out_dir), progress, workers)


def _damaged(shard_dir: Path, what: str) -> UserError:
    return UserError(f"{what}; the shard folder is damaged: delete {shard_dir} and encode again "
                     f"(scratchlm tokenizer encode, or rerun training for a folder in the cache)")


def _complete(meta) -> bool:
    """Whether meta.json holds what readers look up: the dtype, the tokenizer, each split's files and size."""
    if not (isinstance(meta, dict) and meta.get("dtype") in ("uint16", "uint32")
            and isinstance(meta.get("tokenizer"), str) and isinstance(meta.get("splits"), dict)):
        return False
    for split in meta["splits"].values():
        if not (isinstance(split, dict) and isinstance(split.get("tokens"), int) and isinstance(split.get("files"), list)):
            return False
        # plain names only: a path would read files outside the folder
        if not all(isinstance(f, str) and f and Path(f).name == f for f in split["files"]):
            return False
    return True


def read_meta(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{shard_dir} is not a shard folder (no meta.json); make one with `scratchlm tokenizer encode`")
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise _damaged(shard_dir, f"{path} is not valid JSON ({e})") from None
    if not _complete(meta):
        raise _damaged(shard_dir, f"{path} lacks the dtype, tokenizer or split entries of a shard folder")
    return meta


def open_split(shard_dir: Path, split: str) -> list[np.memmap]:
    """The split's shards, memory-mapped: nothing is read until it is indexed. Their sizes are checked
    against meta.json, so a file cut short (a full disk, an interrupted copy) fails here, by name."""
    meta = read_meta(shard_dir)
    if split not in meta["splits"]:
        raise UserError(f"{shard_dir} has no {split!r} split (has: {', '.join(meta['splits'])})")
    dtype = np.dtype(meta["dtype"])
    files = [Path(shard_dir) / name for name in meta["splits"][split]["files"]]
    tokens = 0
    for f in files:
        if not f.is_file():
            raise _damaged(shard_dir, f"{f} is missing")
        size = f.stat().st_size
        if size % dtype.itemsize:
            raise _damaged(shard_dir, f"{f} is {size} bytes, not a whole number of {dtype.itemsize}-byte tokens")
        tokens += size // dtype.itemsize
    expected = meta["splits"][split]["tokens"]
    if tokens != expected:
        where = f"{files[0]} holds" if len(files) == 1 else f"the {split} files of {shard_dir} hold"
        raise _damaged(shard_dir, f"{where} {tokens:,} tokens but meta.json says {expected:,}")
    _room_for_files(len(files))
    return [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size > 0]


def _room_for_files(n: int) -> None:
    """Let this process hold `n` more files open. A memory map keeps a descriptor of its file, and a
    corpus of thousands of shards (train and val, for each data-loading process) passes the usual soft
    limit of 1024: raise it toward the hard limit, which is how far a process may go without privileges."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + len(os.listdir("/proc/self/fd")) + 64 if os.path.isdir("/proc/self/fd") else 2 * n + 256
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise UserError(f"{n:,} shard files need {need:,} open files but this system allows {hard:,} (ulimit -Hn); "
                        f"encode again with a larger data.shard_tokens, or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * need if hard == resource.RLIM_INFINITY else hard, hard))
