"""From a `[data]` config to a tokenizer folder and a shard folder, building and caching what is missing.

Each stage leaves its result on disk under the cache directory, keyed by what it was made from, so a
second run (or a second recipe on the same data) reuses it and each stage can be rerun alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scratchlm.config import DataConfig
from scratchlm.data.shards import encode_corpus, read_meta, tokenizer_fingerprint
from scratchlm.data.sources import cache_dir, get_dataset
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer, train_bpe


@dataclass
class PreparedData:
    tokenizer_dir: Path
    shard_dir: Path


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


def train_tokenizer(inputs: list[Path], vocab_size: int, special_tokens: list[str], out_dir: Path,
                    uncased: bool = False, progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the files and save it into `out_dir` (replaced whole)."""
    vocab, merges = train_bpe([str(p) for p in inputs], vocab_size, special_tokens, uncased=uncased, progress=progress)
    tokenizer = Tokenizer(vocab, merges, special_tokens, uncased=uncased)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tokenizer.save(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return tokenizer


def prepare(cfg: DataConfig, progress: bool = True) -> PreparedData:
    if cfg.shards:
        shard_dir = Path(cfg.shards)
        meta = read_meta(shard_dir)
        if not cfg.tokenizer:
            raise UserError("data.shards is set but data.tokenizer is not: name the tokenizer the shards were made with")
        tok_dir = Path(cfg.tokenizer)
        if meta["tokenizer"] != tokenizer_fingerprint(tok_dir):
            raise UserError(f"{shard_dir} was encoded with another tokenizer than {tok_dir}")
        return PreparedData(tok_dir, shard_dir)

    split = get_dataset(cfg.dataset, progress=progress)
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
        Tokenizer.load(tok_dir)  # fail early, with the loader's message, on a bad folder
    else:
        key = _key(split.name, cfg.vocab_size, cfg.special_tokens, cfg.uncased, split.train_bytes)
        tok_dir = cache_dir() / "tokenizers" / f"{_safe(split.name)}-bpe{cfg.vocab_size}-{key}"
        if not (tok_dir / "tokenizer.json").exists():
            print(f"training a {cfg.vocab_size}-token BPE tokenizer on {split.train} ...", flush=True)
            train_tokenizer([split.train], cfg.vocab_size, cfg.special_tokens, tok_dir, cfg.uncased, progress)
    fingerprint = tokenizer_fingerprint(tok_dir)
    shard_dir = cache_dir() / "shards" / f"{_safe(split.name)}-{fingerprint}-{_key(split.train_bytes, split.val_bytes)}"
    if not (shard_dir / "meta.json").exists():
        tokenizer = Tokenizer.load(tok_dir)
        encode_corpus(tokenizer, tok_dir, {"train": [split.train], "val": [split.val]}, shard_dir, progress)
    return PreparedData(tok_dir, shard_dir)
