"""Corpus -> token shards: flat little-endian arrays of token ids on disk, read back memory-mapped.

A shard folder holds `train_0000.bin`, `val_0000.bin`, ... and `meta.json` (dtype, token and byte counts
per split, and a fingerprint of the tokenizer so shards are never read with the wrong one).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scratchlm.errors import UserError
from scratchlm.train.checkpoint import atomic_write_text

SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per file
READ_CHUNK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(tokenizer_dir).glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _read_pieces(paths: list[Path], bar: tqdm):
    """The files' text as one stream, a megabyte at a time (the tokenizer decides where it may cut)."""
    for path in paths:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
            while piece := f.read(READ_CHUNK):
                bar.update(len(piece.encode("utf-8")))
                yield piece


def encode_split(tokenizer, paths: list[Path], out_dir: Path, split: str, progress: bool = True) -> dict:
    """Encode text files into `<split>_NNNN.bin` shards; returns the split's entry for meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise UserError(f"input file not found: {p}")
    total_bytes = sum(p.stat().st_size for p in paths)
    files, n_tokens, shard, shard_fill, handle = [], 0, 0, 0, None

    def open_shard(i: int):
        name = f"{split}_{i:04d}.bin"
        files.append(name)
        return open(out_dir / f".{name}.tmp", "wb")

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"encode {split}", disable=not progress) as bar:
        handle = open_shard(0)
        for ids in tokenizer.encode_chunks(_read_pieces(paths, bar)):
            ids = np.asarray(ids, dtype=dtype)
            while len(ids):
                room = SHARD_TOKENS - shard_fill
                handle.write(ids[:room].tobytes())
                shard_fill += min(room, len(ids))
                n_tokens += min(room, len(ids))
                ids = ids[room:]
                if shard_fill == SHARD_TOKENS:
                    _close(handle, out_dir, files[-1])
                    shard, shard_fill = shard + 1, 0
                    handle = open_shard(shard)
        _close(handle, out_dir, files[-1])
    return {"files": files, "tokens": n_tokens, "bytes": total_bytes}


def _close(handle, out_dir: Path, name: str) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(out_dir / f".{name}.tmp", out_dir / name)


def encode_corpus(tokenizer, tokenizer_dir: Path, splits: dict[str, list[Path]], out_dir: Path,
                  progress: bool = True) -> dict:
    """Encode every split and write meta.json last, so a folder with meta.json is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": tokenizer_fingerprint(tokenizer_dir), "splits": {}}
    for split, paths in splits.items():
        meta["splits"][split] = encode_split(tokenizer, paths, out_dir, split, progress)
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_meta(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{shard_dir} is not a shard folder (no meta.json); make one with `scratchlm tokenizer encode`")
    return json.loads(path.read_text())


def open_split(shard_dir: Path, split: str) -> list[np.memmap]:
    """The split's shards, memory-mapped: nothing is read until it is indexed."""
    meta = read_meta(shard_dir)
    if split not in meta["splits"]:
        raise UserError(f"{shard_dir} has no {split!r} split (has: {', '.join(meta['splits'])})")
    dtype = np.dtype(meta["dtype"])
    return [np.memmap(Path(shard_dir) / name, dtype=dtype, mode="r") for name in meta["splits"][split]["files"]
            if (Path(shard_dir) / name).stat().st_size > 0]
