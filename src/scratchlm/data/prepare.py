"""From a `[data]` config to a tokenizer folder and a shard folder, building and caching what is missing.

The source is read as a stream (`data/stream.py`): a BPE tokenizer is trained on a sample from its start,
then the stream is encoded into shards (`data/ingest.py`) until the token budget. Each stage leaves its
result under the cache directory, keyed by what it was made from (the source, as far as it can be known
without reading it, and the settings), so a second run (or a second recipe on the same data) reuses it,
an interrupted one resumes, and each stage can be rerun alone. A complete cache is found without touching
the network.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from scratchlm.config import DataConfig
from scratchlm.data import ingest
from scratchlm.data.ingest import Budget, encode_stream, plan_key
from scratchlm.data.shards import NOT_FINGERPRINTED, read_meta, tokenizer_fingerprint
from scratchlm.data.sources import CORPORA, DATASETS, unknown_dataset
from scratchlm.data.stream import HubSource, LocalSource, Source, SplitSource, suffix_of
from scratchlm.errors import UserError
from scratchlm.fetch import cache_dir, digest, say, slug
from scratchlm.files import atomic_dir, atomic_write_text
from scratchlm.tokenizer import Tokenizer, train_bpe
from scratchlm.tokenizer.bpe import train_bpe_on_texts

SAMPLE_FILE = NOT_FINGERPRINTED[0]  # in a tokenizer folder: what it was trained on, how long it took, peak memory


@dataclass
class PreparedData:
    tokenizer_dir: Path
    shard_dir: Path
    meta: dict | None = None    # the shard folder's meta.json


def train_tokenizer(inputs: list[Path], vocab_size: int, special_tokens: list[str], out_dir: Path,
                    uncased: bool = False, progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the files and save it into `out_dir` (replaced whole)."""
    vocab, merges = train_bpe([str(p) for p in inputs], vocab_size, special_tokens, uncased=uncased, progress=progress)
    tokenizer = Tokenizer(vocab, merges, special_tokens, uncased=uncased)
    with atomic_dir(Path(out_dir)) as tmp:
        tokenizer.save(tmp)
    return tokenizer


def open_source(cfg: DataConfig, progress: bool = True) -> Source:
    """`data.dataset` as a stream: the small named sets and a single text file with the split they have
    always had (`sources.get_dataset`); a seed corpus, `hf:`, a folder or a record file streamed."""
    spec, field, specials = cfg.dataset, cfg.text_field, cfg.special_tokens
    if spec in CORPORA:
        spec, field = CORPORA[spec].spec, CORPORA[spec].text_field
    if spec in DATASETS:
        return SplitSource(spec, specials, progress)
    if spec.startswith("hf:"):
        return HubSource(spec, field, specials, cfg.val_every)
    path = Path(spec).expanduser()
    if not path.exists():
        raise unknown_dataset(spec)
    if path.is_file() and suffix_of(path) == ".txt":
        return SplitSource(spec, specials, progress)
    return LocalSource(path, field, specials, cfg.val_every)


def validation_rule(source: Source, val_tokens: int) -> str:
    """The validation split in words, as meta.json records it."""
    cap = f"up to {val_tokens:,} tokens" if val_tokens else "with no cap"
    if isinstance(source, SplitSource):
        return f"the dataset's own validation split (its val.txt, as `scratchlm data get` makes it), {cap}"
    n = source.val_every
    nth = f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
    return (f"every {nth} record (records {n - 1}, {2 * n - 1}, ... counting from 0), {cap}; held-out records "
            f"past the cap are used for neither split")


# ----------------------------------------------------------------------------- the tokenizer
def sample_batches(source: Source, limit: int, stats: dict):
    """Batches of the texts of the first train documents of `source`, until `limit` UTF-8 bytes (reached
    at the end of an item: a document, or a piece of about a megabyte of a long one)."""
    stats.update(documents=0, bytes=0, records=0, files=0)
    batch, size, keep = [], 0, False
    for item in source.items():
        stats["files"] = item.file + 1
        if item.new_doc:
            keep = not source.val_candidate(stats["records"])
            stats["records"] += 1
            stats["documents"] += keep and bool(item.text)
        if not keep or not item.text:
            continue
        stats["bytes"] += len(item.text.encode("utf-8", "surrogatepass"))
        batch.append(item.text)
        size += len(item.text)
        if size >= ingest.BATCH_CHARS:
            yield batch
            batch, size = [], 0
        if stats["bytes"] >= limit:
            break
    if batch:
        yield batch


def train_on_sample(source: Source, cfg: DataConfig, out_dir: Path, progress: bool = True) -> Tokenizer:
    """Train the tokenizer on the first `cfg.tokenizer_sample_bytes` of the source's train documents and
    save it, with `training.json` (the sample, the time, the peak memory), into `out_dir`."""
    if hasattr(source, "pin"):
        source.pin()
    say(progress, f"training a {cfg.vocab_size:,}-token BPE tokenizer on up to "
                  f"{cfg.tokenizer_sample_bytes / 1e6:,.0f} MB of {source.label}")
    stats: dict = {}
    start = time.monotonic()
    # the counting workers take batches a few at a time, so the bytes handed out track their progress
    bar = tqdm(total=cfg.tokenizer_sample_bytes, unit="B", unit_scale=True, desc="tokenizer sample",
               disable=not progress, file=sys.stderr, delay=1.0)

    def counted():
        for batch in sample_batches(source, cfg.tokenizer_sample_bytes, stats):
            bar.update(stats["bytes"] - bar.n)
            yield batch
        bar.close()  # before the merges' own bar

    try:
        vocab, merges = train_bpe_on_texts(counted(), cfg.vocab_size, cfg.special_tokens, uncased=cfg.uncased,
                                           workers=cfg.workers or None, progress=progress)
    finally:
        bar.close()
    seconds = time.monotonic() - start
    tokenizer = Tokenizer(vocab, merges, cfg.special_tokens, uncased=cfg.uncased)
    # ru_maxrss: the peak of this process over its life (an upper bound on training's) and of the
    # largest counting worker; KiB on Linux
    peak = {"main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "largest_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
    record = {"source": source.describe(), "vocab_size": tokenizer.vocab_size, "uncased": cfg.uncased,
              "special_tokens": cfg.special_tokens,
              "sample": {"rule": "the first train documents of the stream, in order (held-out records "
                                 "skipped), until the limit: the end of a document or of a ~1 MB piece of one",
                         "limit_bytes": cfg.tokenizer_sample_bytes, "bytes": stats["bytes"],
                         "documents": stats["documents"], "records_read": stats["records"],
                         "stamps": source.stamps()[:stats["files"]]},
              "seconds": round(seconds, 1), "peak_memory": peak}
    if getattr(source, "revision", None):
        record["source"]["revision"] = source.revision
    with atomic_dir(Path(out_dir)) as tmp:
        tokenizer.save(tmp)
        atomic_write_text(tmp / SAMPLE_FILE, json.dumps(record, indent=1) + "\n")
    say(progress, f"tokenizer trained on {stats['bytes'] / 1e6:,.1f} MB ({stats['documents']:,} documents) in "
                  f"{seconds:,.0f} s; peak memory {peak['main_mb']:,} MB (largest worker {peak['largest_worker_mb']:,} MB)")
    return tokenizer


# ----------------------------------------------------------------------------- the whole stage
def prepare(cfg: DataConfig, progress: bool = True) -> PreparedData:
    if cfg.shards:
        shard_dir = Path(cfg.shards)
        meta = read_meta(shard_dir)
        if not cfg.tokenizer:
            raise UserError("data.shards is set but data.tokenizer is not: name the tokenizer the shards were made with")
        tok_dir = Path(cfg.tokenizer)
        if meta["tokenizer"] != tokenizer_fingerprint(tok_dir):
            raise UserError(f"{shard_dir} was encoded with another tokenizer than {tok_dir}")
        return PreparedData(tok_dir, shard_dir, meta)

    source = open_source(cfg, progress)
    rule = validation_rule(source, cfg.val_tokens)
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
        Tokenizer.load(tok_dir)  # fail early, with the loader's message, on a bad folder
    else:
        held_out = source.n_val if isinstance(source, SplitSource) else source.val_every
        key = digest(source.key, held_out, cfg.vocab_size, cfg.special_tokens, cfg.uncased, cfg.tokenizer_sample_bytes)
        tok_dir = cache_dir() / "tokenizers" / f"{slug(Path(source.label).name)}-bpe{cfg.vocab_size}-{key}"
        if not _trained_on(tok_dir, source):
            train_on_sample(source, cfg, tok_dir, progress)
    budget = Budget(cfg.max_tokens, cfg.val_tokens, cfg.shard_tokens)
    plan = plan_key(tok_dir, source, budget, rule)
    shard_dir = cache_dir() / "shards" / f"{slug(Path(source.label).name)}-{tokenizer_fingerprint(tok_dir)}-{plan}"
    if not (shard_dir / "meta.json").exists():
        say(progress, f"encoding {source.label} into {shard_dir}")
    # returns at once when the folder is complete (and its files unchanged); resumes one stopped part way
    meta = encode_stream(Tokenizer.load(tok_dir), tok_dir, source, shard_dir, budget, rule, cfg.workers, progress)
    return PreparedData(tok_dir, shard_dir, meta)


def _trained_on(tok_dir: Path, source: Source) -> bool:
    """Whether the cached tokenizer is there and the files its sample came from are unchanged."""
    if not (tok_dir / "tokenizer.json").exists():
        return False
    try:
        read = json.loads((tok_dir / SAMPLE_FILE).read_text())["sample"].get("stamps", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return isinstance(read, list) and read == source.stamps()[:len(read)]


def summary(data: PreparedData) -> str:
    """What `scratchlm data prepare` prints."""
    meta = data.meta or read_meta(data.shard_dir)
    lines = [f"tokenizer {data.tokenizer_dir}", f"shards    {data.shard_dir}"]
    for name, split in meta["splits"].items():
        docs = f", {split['documents']:,} documents" if "documents" in split else ""
        lines.append(f"{name:5s} {split['tokens']:,} tokens in {len(split['files'])} shard(s){docs}")
    budget = meta.get("budget")
    if budget and budget.get("max_tokens"):
        lines.append(f"budget {budget['max_tokens']:,} train tokens: " + ("reached" if budget["reached"] else
                                                                          "not reached, the source ended first"))
    if meta.get("validation"):
        lines.append(f"validation: {meta['validation']}")
    return "\n".join(lines)
