"""From a `[data]` config to a tokenizer folder and a shard folder, building and caching what is missing.

Each stage leaves its result on disk under the cache directory, keyed by what it was made from, so a
second run (or a second recipe on the same data) reuses it and each stage can be rerun alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scratchlm.config import DataConfig
from scratchlm.data.shards import encode_corpus, read_meta, tokenizer_fingerprint
from scratchlm.data.sources import get_dataset
from scratchlm.errors import UserError
from scratchlm.fetch import cache_dir, digest, slug
from scratchlm.files import atomic_dir
from scratchlm.tokenizer import Tokenizer, train_bpe


@dataclass
class PreparedData:
    tokenizer_dir: Path
    shard_dir: Path


def train_tokenizer(inputs: list[Path], vocab_size: int, special_tokens: list[str], out_dir: Path,
                    uncased: bool = False, progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the files and save it into `out_dir` (replaced whole)."""
    vocab, merges = train_bpe([str(p) for p in inputs], vocab_size, special_tokens, uncased=uncased, progress=progress)
    tokenizer = Tokenizer(vocab, merges, special_tokens, uncased=uncased)
    with atomic_dir(Path(out_dir)) as tmp:
        tokenizer.save(tmp)
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
        key = digest(split.name, cfg.vocab_size, cfg.special_tokens, cfg.uncased, split.train_bytes)
        tok_dir = cache_dir() / "tokenizers" / f"{slug(split.name)}-bpe{cfg.vocab_size}-{key}"
        if not (tok_dir / "tokenizer.json").exists():
            print(f"training a {cfg.vocab_size}-token BPE tokenizer on {split.train} ...", flush=True)
            train_tokenizer([split.train], cfg.vocab_size, cfg.special_tokens, tok_dir, cfg.uncased, progress)
    fingerprint = tokenizer_fingerprint(tok_dir)
    shard_dir = cache_dir() / "shards" / f"{slug(split.name)}-{fingerprint}-{digest(split.train_bytes, split.val_bytes)}"
    if not (shard_dir / "meta.json").exists():
        tokenizer = Tokenizer.load(tok_dir)
        encode_corpus(tokenizer, tok_dir, {"train": [split.train], "val": [split.val]}, shard_dir, progress)
    return PreparedData(tok_dir, shard_dir)
