"""A stream of documents into token shards: parallel, within a token budget, resumable after any stop.

The main process reads the source (`data/stream.py`) item by item and hands batches of about 2 MB of text
to `workers` processes, which encode them (on tiktoken's engine, `Tokenizer.encode_array`); it takes the
results back in the order the batches were made and appends them to the shards, so the shards are the
same bytes whatever the number of workers. At most a few batches per worker are read ahead: memory holds
those and nothing of the corpus besides.

Each document's tokens go whole to one split, with the tokenizer's `<eos>` before every document but a
split's first (when it has that token). Train takes the records the source does not hold out for
validation, until `max_tokens` (the budget; the last document is cut there); validation takes the
held-out ones until `val_tokens`. The shards are `train_0000.bin`, `val_0000.bin`, ..., `shard_tokens`
tokens each but the last; `meta.json`, written last, records the source, the budget, the validation
rule, and the tokens and documents of every shard (a document counts in the shard its first token is in).

Resume: every few seconds, and when it stops, the run flushes the shards to disk and records in
`.progress.json` how far each is written and which item of the source comes next. A rerun with the same
inputs cuts the shards back to that record and reads on from that item, so a run stopped anywhere (an
error, Ctrl-C, SIGKILL, a full disk) and started again writes exactly the bytes of one that never stopped.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scratchlm.data.shards import token_dtype, tokenizer_fingerprint
from scratchlm.data import stream
from scratchlm.data.stream import Item, Source
from scratchlm.errors import UserError
from scratchlm.files import atomic_write_text, fsync_dir
from scratchlm.runtime import usable_cpus

BATCH_CHARS = 1 << 21   # text per unit of parallel work
SAVE_SECONDS = 5.0      # between records of progress (each one syncs the shards to disk)
PROGRESS = ".progress.json"
FORMAT_VERSION = 3      # bump when the same inputs would give other shards


@dataclass(frozen=True)
class Budget:
    max_tokens: int = 0          # train tokens, 0: no limit
    val_tokens: int = 0          # validation tokens, 0: no limit
    shard_tokens: int = 100_000_000


# ----------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(blob: bytes, dtype: str) -> None:
    _WORKER["tok"], _WORKER["dtype"] = pickle.loads(blob), np.dtype(dtype)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids of each text, end to end, how many belong to each, and each text's UTF-8 size."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    arrays = [tok.encode_array(t, dtype) for t in texts]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    sizes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts))
    return (np.concatenate(arrays) if arrays else np.zeros(0, dtype)), lengths, sizes


def batches(items: Iterator[Item], chars: int | None = None) -> Iterator[list[Item]]:
    """Consecutive items, about `chars` (default BATCH_CHARS) characters at a time."""
    chars = chars or BATCH_CHARS
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item.text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded(tokenizer, dtype: np.dtype, batches_: Iterator[list[Item]], workers: int):
    """(batch, ids, lengths, sizes) for each batch, in order (see `_encode_batch`), encoded in `workers`
    processes."""
    blob = pickle.dumps(tokenizer)
    if workers <= 1:
        _init_worker(blob, dtype.str)
        for batch in batches_:
            yield (batch, *_encode_batch([it.text for it in batch]))
        return
    # fork where there is one, as the trainer does: spawn re-runs the caller's main module in each worker
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(blob, dtype.str))
    try:
        pending: collections.deque = collections.deque()
        for batch in batches_:
            pending.append((batch, pool.apply_async(_encode_batch, ([it.text for it in batch],))))
            if len(pending) >= 2 * workers:
                batch, result = pending.popleft()
                yield (batch, *result.get())
        while pending:
            batch, result = pending.popleft()
            yield (batch, *result.get())
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- one split's shards
class SplitWriter:
    """Appends ids to `<split>_NNNN.bin` files of `shard_tokens` each; the one being filled is a hidden
    `.NAME.tmp` until it is full. `state` (a dict kept in `.progress.json`) says what is on disk."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, cap: int, state: dict):
        self.dir, self.split, self.dtype, self.shard_tokens, self.cap = out_dir, split, dtype, shard_tokens, cap
        self.state = state
        if not state:
            state.update(shards=[{"tokens": 0, "documents": 0}], tokens=0, documents=0, bytes=0)
        self._handle = self._reopen()

    def _name(self, i: int) -> str:
        return f"{self.split}_{i:04d}.bin"

    def _reopen(self):
        """The shard being filled, cut back to what the state records; later files removed."""
        shards = self.state["shards"]
        current = len(shards) - 1
        tmp, final = self.dir / f".{self._name(current)}.tmp", self.dir / self._name(current)
        if not tmp.exists() and final.exists():
            os.replace(final, tmp)  # it was finished after the last record of progress
        for f in [*self.dir.glob(f"{self.split}_[0-9]*.bin"), *self.dir.glob(f".{self.split}_[0-9]*.bin.tmp")]:
            index = int(f.name.lstrip(".").split("_")[-1].split(".")[0])
            if index >= current and f != tmp:
                f.unlink()
        want = shards[-1]["tokens"] * self.dtype.itemsize
        if (tmp.stat().st_size if tmp.exists() else 0) < want:
            raise UserError(f"{tmp} is shorter than {self.dir / PROGRESS} records; delete {self.dir} and run again")
        handle = open(tmp, "r+b" if tmp.exists() else "wb")
        handle.truncate(want)
        handle.seek(want)
        return handle

    @property
    def full(self) -> bool:
        return bool(self.cap) and self.state["tokens"] >= self.cap

    def room(self) -> int:
        return self.cap - self.state["tokens"] if self.cap else 1 << 62

    def write(self, ids: np.ndarray, starts_document: bool) -> None:
        shards = self.state["shards"]
        if starts_document and len(ids):
            shards[-1]["documents"] += 1
            self.state["documents"] += 1
        while len(ids):
            take = min(len(ids), self.shard_tokens - shards[-1]["tokens"])
            self._handle.write(ids[:take].tobytes())
            shards[-1]["tokens"] += take
            self.state["tokens"] += take
            ids = ids[take:]
            if shards[-1]["tokens"] == self.shard_tokens:
                self._finish_file()
                shards.append({"tokens": 0, "documents": 0})
                self._handle = open(self.dir / f".{self._name(len(shards) - 1)}.tmp", "wb")

    def _finish_file(self) -> None:
        self.sync()
        self._handle.close()
        current = len(self.state["shards"]) - 1
        os.replace(self.dir / f".{self._name(current)}.tmp", self.dir / self._name(current))

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def finish(self) -> dict:
        """Close the last file under its own name (none when the one before ended the split exactly);
        the split's entry of meta.json."""
        shards = self.state["shards"]
        if len(shards) > 1 and not shards[-1]["tokens"]:
            self._handle.close()
            (self.dir / f".{self._name(len(shards) - 1)}.tmp").unlink()
            shards.pop()
        else:
            self._finish_file()
        shards = [{"file": self._name(i), **s} for i, s in enumerate(self.state["shards"])]
        return {"files": [s["file"] for s in shards], "tokens": self.state["tokens"],
                "documents": self.state["documents"], "bytes": self.state["bytes"], "shards": shards}


# ----------------------------------------------------------------------------- the run
def plan_key(tokenizer_dir: Path, source: Source, budget: Budget, rule: str) -> str:
    """What the shards depend on; a folder's progress from another plan is not resumed."""
    key = [FORMAT_VERSION, tokenizer_fingerprint(tokenizer_dir), source.key, rule, budget.max_tokens,
           budget.val_tokens, budget.shard_tokens, stream.PIECE_CHARS]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _unchanged(recorded: list, stamps: list) -> bool:
    """Whether the files a run read (their stamps then) are still the same."""
    return isinstance(recorded, list) and recorded == stamps[:len(recorded)]


def _resumable(state: dict, plan: str, stamps: list) -> dict | None:
    """The progress to go on from: as recorded while the files read are unchanged; back at the start of
    the file being read when only that one changed (a bad record fixed in place: the files before it
    keep their shards); None to start over."""
    if state.get("plan") != plan:
        return None
    recorded = state.get("stamps", [])
    if _unchanged(recorded, stamps):
        return state
    start = state.get("file_start")
    if recorded and _unchanged(recorded[:-1], stamps) and isinstance(start, dict):
        start["file_start"] = json.loads(json.dumps(start))  # the place to come back to, should it change again
        return start
    return None


def _snapshot(state: dict, item: Item) -> dict:
    """The state as it is before `item`, the first of a file, is read (see `_resumable`)."""
    copy = json.loads(json.dumps({k: v for k, v in state.items() if k != "file_start"}))
    copy.update(next=[item.file, item.record, item.part], file=item.file, file_start=None)
    return copy


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _size(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


class _Bar:
    """The one progress bar: tokens against the budget when there is one, else input bytes against the
    source's size when it is known; documents, text MB/s and shards beside."""

    def __init__(self, source: Source, budget: Budget, state: dict, progress: bool):
        self.by_tokens = bool(budget.max_tokens)
        total = budget.max_tokens if self.by_tokens else source.total
        self.bar = tqdm(total=total, unit="tok" if self.by_tokens else "B", unit_scale=True, desc="prepare",
                        disable=not progress, file=sys.stderr, dynamic_ncols=True,
                        initial=state["train"].get("tokens", 0) if self.by_tokens else state.get("read") or 0)
        self.start, self.text0 = time.monotonic(), state["text_bytes"]
        self.last = 0.0

    def update(self, state: dict, done: int | None, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.last < 0.5 and not force:
            return
        self.last = now
        if self.by_tokens:
            self.bar.n = state["train"]["tokens"]
        elif done is not None:
            self.bar.n = done
        train, val = state["train"], state["val"]
        rate = (state["text_bytes"] - self.text0) / max(1e-9, now - self.start) / 1e6
        self.bar.set_postfix_str(
            f"docs {train['documents'] + val['documents']:,}, text {_size(state['text_bytes'])}, {rate:.1f} MB/s, "
            f"tokens {train['tokens'] + val['tokens']:,}, shards {len(train['shards']) + len(val['shards'])}",
            refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def encode_stream(tokenizer, tokenizer_dir: Path, source: Source, out_dir: Path, budget: Budget, rule: str,
                  workers: int = 0, progress: bool = True) -> dict:
    """Encode `source` into a shard folder (see the module docstring) and return its meta.json. A folder
    already complete for these inputs is returned as it is; one stopped part way is resumed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_key(tokenizer_dir, source, budget, rule)
    meta_path, progress_path = out_dir / "meta.json", out_dir / PROGRESS
    stamps = source.stamps()
    old = _load(meta_path)
    if old.get("plan") == plan and _unchanged(old.get("stamps", []), stamps):
        return old
    meta_path.unlink(missing_ok=True)
    state = _resumable(_load(progress_path), plan, stamps)
    if state is None:
        for f in [*out_dir.glob("*_[0-9]*.bin"), *out_dir.glob(".*_[0-9]*.bin.tmp")]:
            f.unlink()  # another run's shards would linger unlisted
        state = {"plan": plan, "next": [0, 0, 0], "records": 0, "doc": None, "text_bytes": 0, "read": None,
                 "revision": None, "file": 0, "file_start": None, "train": {}, "val": {}}
    if hasattr(source, "pin"):
        state["revision"] = source.pin(state["revision"])

    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    eos_ids = np.array([] if eos is None else [eos], dtype=dtype)
    writers = {"train": SplitWriter(out_dir, "train", dtype, budget.shard_tokens, budget.max_tokens, state["train"]),
               "val": SplitWriter(out_dir, "val", dtype, budget.shard_tokens, budget.val_tokens, state["val"])}

    def save() -> None:
        for w in writers.values():
            w.sync()
        state["stamps"] = stamps[:state["next"][0] + 1]  # the files read so far
        atomic_write_text(progress_path, json.dumps(state))

    workers = workers or usable_cpus()
    results = encoded(tokenizer, dtype, batches(source.items(*state["next"])), workers)
    bar = _Bar(source, budget, state, progress)
    try:
        _run(results, source, writers, eos_ids, state, save, bar)
    except BaseException as e:
        if isinstance(e, UserError):
            save()  # a bad record: what came before it stays written, and a rerun resumes there
        for w in writers.values():
            w.close()
        raise
    finally:
        results.close()  # stops the workers now, also when interrupted
        bar.close()
    empty = [split for split, w in writers.items() if not w.state["tokens"]]
    if empty:
        for w in writers.values():
            w.close()
        raise _empty(empty[0], source, rule)

    meta = {"format": FORMAT_VERSION, "plan": plan, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
            "tokenizer": tokenizer_fingerprint(tokenizer_dir),
            "source": {**source.describe(), **({"revision": state["revision"]} if state["revision"] else {})},
            "records": state["records"], "stamps": state["stamps"],
            "budget": {"max_tokens": budget.max_tokens, "val_tokens": budget.val_tokens,
                       "shard_tokens": budget.shard_tokens, "reached": writers["train"].full},
            "validation": rule,
            "documents": ({"separator": "eos", "eos_id": eos, "note": "<eos> between consecutive documents"}
                          if eos is not None else
                          {"separator": "none", "eos_id": None,
                           "note": "the tokenizer has no <eos>; documents are encoded apart but not marked"}),
            "splits": {split: w.finish() for split, w in writers.items()}}
    fsync_dir(out_dir)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    progress_path.unlink(missing_ok=True)
    return meta


def _run(results, source: Source, writers: dict[str, SplitWriter], eos_ids: np.ndarray, state: dict, save,
         bar: _Bar) -> None:
    """Route each item's ids to its split until the source ends or the train budget is spent, recording
    progress every SAVE_SECONDS and at the end. Depends on the items alone, never on how they were
    batched: a resumed run batches them from another place."""
    if writers["train"].full:
        return  # stopped after the budget was spent, before meta.json was written
    saved = time.monotonic()
    doc = state["doc"]  # the document being written: its split (None: dropped) and whether it has begun
    for batch, ids, lengths, sizes in results:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for k, item in enumerate(batch):
            if item.file != state["file"]:
                state["file"], state["file_start"] = item.file, _snapshot(state, item)
            if item.new_doc:
                record = state["records"]
                state["records"] += 1
                split = "val" if source.val_candidate(record) else "train"
                doc = {"split": None if writers[split].full else split, "begun": False}
            state["next"], state["read"], state["doc"] = [item.file, item.record, item.part + 1], item.done, doc
            if doc["split"] is None or not lengths[k]:
                continue
            w = writers[doc["split"]]
            piece = ids[offsets[k]:offsets[k + 1]]
            starts = not doc["begun"]
            if starts and w.state["tokens"]:
                piece = np.concatenate([eos_ids, piece])
            w.write(piece[:w.room()], starts)
            w.state["bytes"] += int(sizes[k])
            state["text_bytes"] += int(sizes[k])
            doc["begun"] = True
            if w.full:
                doc["split"] = None  # the rest of this document goes nowhere
                if w is writers["train"]:
                    bar.update(state, state["read"], force=True)
                    save()
                    return
        bar.update(state, state["read"])
        if time.monotonic() - saved >= SAVE_SECONDS:
            save()
            saved = time.monotonic()
    bar.update(state, state["read"], force=True)
    save()


def _empty(split: str, source: Source, rule: str) -> UserError:
    if split == "val":
        return UserError(f"{source.label} gave no validation text ({rule}): it has too few records; "
                         f"lower data.val_every")
    return UserError(f"{source.label} gave no training text")
