"""`scratchlm eval` on a text source: a checkpoint's loss, perplexity and bits per byte at one or more
context lengths, and the n-gram baseline on the same tokenizer and the same validation text."""
from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.errors import UserError


def val_shards(tokenizer, tokenizer_dir: Path, source: str, progress: bool = True) -> Path:
    """The validation split of `source`, encoded with this tokenizer, cached by what it was made from
    (dataset, its size and the tokenizer's fingerprint), so a second eval reads it back."""
    from scratchlm.data.shards import encode_corpus, tokenizer_fingerprint
    from scratchlm.data.sources import get_dataset
    from scratchlm.fetch import cache_dir, digest, slug

    split = get_dataset(source, progress=progress)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    shard_dir = cache_dir() / "eval-shards" / f"{slug(split.name)}-{fingerprint}-{digest(split.val_bytes)}"
    if not (shard_dir / "meta.json").exists():
        encode_corpus(tokenizer, tokenizer_dir, {"val": [split.val]}, shard_dir, progress)
    return shard_dir


def context_limit(config) -> int | None:
    """The longest context a model can read: learned positions stop at their table, the rest do not."""
    return config.model.context if config.model.position == "learned" else None


def eval_contexts(loaded, source: str, contexts: list[int], batch: int = 16, max_tokens: int = 0,
                  device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """One row per context: {"context", "val_loss", "val_ppl", "val_bpb", ...} or {"context", "skipped"}.
    Batches shrink as the context grows, so each holds about as many tokens as at the training length."""
    from scratchlm.data.shards import open_split
    from scratchlm.eval.metrics import evaluate

    for c in contexts:
        if c < 1:
            raise UserError(f"--context {c}: a context length must be at least 1")
    run_dir = loaded.checkpoint.parent.parent
    shard_dir = val_shards(loaded.tokenizer, run_dir / "tokenizer", source, progress)
    shards = open_split(shard_dir, "val")
    token_bytes = torch.tensor(loaded.tokenizer.token_byte_lengths())
    limit, trained = context_limit(loaded.config), loaded.config.model.context
    rows = []
    for c in contexts:
        if limit is not None and c > limit:
            rows.append({"context": c, "skipped": f"learned positions stop at {limit}"})
            continue
        b = max(1, batch * trained // max(c, trained))
        rows.append({"context": c, **evaluate(loaded.model, shards, token_bytes, context=c, batch=b,
                                              max_tokens=max_tokens, device=device)})
    return rows


def format_row(source: str, row: dict) -> str:
    if "skipped" in row:
        return f"context {row['context']}: {row['skipped']}; skipped"
    where = f"{source} val" + (f", context {row['context']}" if "context" in row else "")
    return (f"{where}: loss {row['val_loss']:.4f}, perplexity {row['val_ppl']:.2f}, "
            f"bits per byte {row['val_bpb']:.4f} ({row['val_tokens']:,} tokens)")


def ngram_baseline(order: int, source: str, tokenizer_dir: Path, discount: float | None = None,
                   progress: bool = True) -> dict:
    """Fit an interpolated Kneser-Ney model on the train split of `source` (encoded with the tokenizer in
    `tokenizer_dir`, through the same cache pretraining uses) and score its validation split."""
    import numpy as np

    from scratchlm.config import DataConfig
    from scratchlm.data.prepare import prepare
    from scratchlm.data.shards import open_split
    from scratchlm.eval.ngram import KneserNey
    from scratchlm.tokenizer import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = KneserNey(order, tokenizer.vocab_size, discount)  # a bad order fails before any encoding
    data = prepare(DataConfig(dataset=source, tokenizer=str(tokenizer_dir)), progress)
    train = np.concatenate([np.asarray(s, dtype=np.int64) for s in open_split(data.shard_dir, "train")])
    model.fit(train)
    row = model.evaluate(open_split(data.shard_dir, "val"), tokenizer.token_byte_lengths())
    return {**row, "order": order, "train_tokens": len(train),
            "discounts": {k: round(d, 4) for k, d in model.discount.items()}}


def run_data(checkpoint: str) -> tuple[Path, str]:
    """A run's tokenizer folder and the dataset it was trained on, for a baseline on the same terms."""
    from scratchlm.config import load_config
    from scratchlm.rundir import resolve_checkpoint

    run_dir, _ = resolve_checkpoint(checkpoint)
    return run_dir / "tokenizer", load_config(run_dir / "config.toml").data.dataset


def evaluate_run(checkpoint: str, source: str | None = None, contexts: list[int] | None = None, batch: int = 16,
                 max_tokens: int = 0, device: str = "auto", progress: bool = True) -> tuple[str, list[dict]]:
    """A checkpoint's rows of `eval_contexts` on the validation split of `source` (default: the dataset it
    was trained on) at each of `contexts` (default: its training context). Returns (source, rows)."""
    from scratchlm.loading import load
    from scratchlm.runtime import pick_device

    if batch < 1:
        raise UserError(f"--batch {batch}: score at least 1 window at a time")
    if max_tokens < 0:
        raise UserError(f"--max-tokens {max_tokens}: give a number of tokens >= 1, or 0 for the whole split")
    device = pick_device(device)
    loaded = load(checkpoint, device)
    source = source or loaded.config.data.dataset
    rows = eval_contexts(loaded, source, contexts or [loaded.config.model.context], batch, max_tokens, device, progress)
    return source, rows
