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


def run_eval(a) -> None:
    """The `scratchlm eval` command: one of a task file, the n-gram baseline, or the checkpoint's
    loss at each context length."""
    if a.baseline:
        if a.baseline != "ngram":
            raise UserError(f"--baseline {a.baseline!r}: the one baseline is ngram")
        if a.tokenizer:
            tokenizer_dir, run_source = Path(a.tokenizer), None
        elif a.checkpoint:
            from scratchlm.config import load_config
            from scratchlm.rundir import resolve_checkpoint

            run_dir, _ = resolve_checkpoint(a.checkpoint)
            tokenizer_dir, run_source = run_dir / "tokenizer", load_config(run_dir / "config.toml").data.dataset
        else:
            raise UserError("--baseline ngram needs a tokenizer: --tokenizer DIR, or --checkpoint RUN for the run's own")
        source = a.data or run_source
        if not source:
            raise UserError("--baseline ngram needs --data SOURCE (a dataset name, a path or hf:NAME)")
        row = ngram_baseline(a.order, source, tokenizer_dir, a.discount)
        print(f"{a.order}-gram Kneser-Ney, trained on {row['train_tokens']:,} tokens of {source} train "
              f"(discounts {row['discounts']})")
        print(format_row(source, row))
        return
    if not a.checkpoint:
        raise UserError("name a model to evaluate with --checkpoint RUN (or use --baseline ngram --tokenizer DIR)")
    from scratchlm.loading import load
    from scratchlm.runtime import pick_device

    device = pick_device(a.device)
    loaded = load(a.checkpoint, device)
    if a.task:
        from scratchlm.eval.tasks import run_task

        run_task(loaded, Path(a.task), a.max_new_tokens, a.batch, a.out, a.limit)
        return
    source = a.data or loaded.config.data.dataset
    for row in eval_contexts(loaded, source, a.context or [loaded.config.model.context], a.batch, a.max_tokens, device):
        print(format_row(source, row))
