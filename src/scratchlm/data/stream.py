"""Sources read as streams of documents, in a fixed order, from any position: the input of `data prepare`.

A source yields `Item`s: a document's text, or a piece of it when the document is long (a text file of
gigabytes is cut, where the cut cannot change its tokens, into pieces of about a megabyte, so nothing holds
a whole document in memory). Each item says where it sits, (file, record, part), so that a rerun can
start reading right after the last item an interrupted run wrote. Records that hold no text (a null or
empty field, a blank line) still come as an empty item: the record numbers, and so the validation rule
below, never depend on what is skipped.

Sources:
- `LocalSource`: a folder (searched recursively, files in path order) or a single file of `.parquet`,
  `.jsonl`, `.jsonl.zst` or `.txt`; a record of the first three is a document, a `.txt` file is one.
  Read file by file, batch by batch: no copy of the text is made on disk.
- `HubSource`: `hf:NAME[:CONFIG][@SPLIT]` read with `datasets.load_dataset(..., streaming=True)`, at the
  revision found when the stream was first opened.
- `SplitSource`: a dataset materialised by `sources.get_dataset` (the small named sets, a single text
  file), whose train/val split is already made: its validation documents come first, then the train ones.

Validation: a streamed source holds out every Nth record (`data.val_every`): records N-1, 2N-1, ... are
validation candidates, in order, until `data.val_tokens`; candidates after that are used for neither
split, so the train split does not depend on the size of the validation one.
"""
from __future__ import annotations

import abc
import codecs
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from scratchlm.errors import UserError
from scratchlm.fetch import digest, first_line, import_datasets, parse_hf_spec

SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst", ".txt")
PIECE_CHARS = 1 << 20  # a long document is cut into pieces of about this many characters
_READ = 1 << 20        # bytes read at a time from text files
_ROWS = 1024           # parquet rows per batch


class Item(NamedTuple):
    text: str
    new_doc: bool      # starts a document (False: continues the one before, a long text cut in pieces)
    file: int          # where it sits: file index (0 for a stream from the Hub), record in it, piece of it
    record: int
    part: int
    done: int | None   # input bytes consumed once this item is read; None where unknown (the Hub)


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def pieces(chunks, specials: list[str], size: int | None = None) -> Iterator[str]:
    """The text of `chunks` (strings) in pieces of about `size` (default PIECE_CHARS) characters, cut only
    where encoding the pieces apart gives the tokens of the whole (`pretokenize.find_cut`). Always at
    least one piece."""
    from scratchlm.tokenizer.pretokenize import find_cut

    size = size or PIECE_CHARS
    buf, target, sent = "", size, False
    for chunk in chunks:
        buf += chunk
        while len(buf) >= target:
            cut = find_cut(buf[:size], specials) or find_cut(buf, specials)
            if not cut:
                target = 2 * len(buf)  # no place to cut yet: read on, and rescan only after as much again
                break
            yield buf[:cut]
            sent, buf, target = True, buf[cut:], size
    if buf or not sent:
        yield buf


class Source(abc.ABC):
    """A stream of documents; see the module docstring."""
    label: str             # for messages
    key: str               # what the cache folder is named by: no network is touched to compute it
    total: int | None      # input bytes, when known
    specials: list[str]

    @abc.abstractmethod
    def items(self, file: int = 0, record: int = 0, part: int = 0) -> Iterator[Item]:
        """The documents from the given place on (a resumed ingestion starts where the last one stopped)."""

    @abc.abstractmethod
    def val_candidate(self, record: int) -> bool:
        """Whether the record with this index (counted over the whole stream) is held out for validation."""

    def stamps(self) -> list:
        """[name, size, mtime] of each input file, in order, for sources whose files may be edited in place:
        work made from the first files stays good as long as those files have the same stamps."""
        return []

    @abc.abstractmethod
    def describe(self) -> dict:
        """What meta.json records of the source."""

    def _split_records(self, texts, file: int, record: int, part: int, done) -> Iterator[Item]:
        """Items of the records `texts` yields (the first of them being record `record`), the first one
        starting at piece `part`; `done()` says how far the input has been read."""
        for r, text in enumerate(texts, record):
            if len(text) <= PIECE_CHARS:
                if not part:
                    yield Item(text, True, file, r, 0, done())
            else:
                chunks = (text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS))
                for p, piece in enumerate(pieces(chunks, self.specials)):
                    if p >= part:
                        yield Item(piece, p == 0, file, r, p, done())
            part = 0


class EveryNth:
    """The validation rule of streamed sources."""
    def __init__(self, n: int):
        self.val_every = n

    def val_candidate(self, record: int) -> bool:
        return record % self.val_every == self.val_every - 1


# ----------------------------------------------------------------------------- local files
class LocalSource(EveryNth, Source):
    def __init__(self, path: Path, text_field: str, specials: list[str], val_every: int):
        super().__init__(val_every)
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file() and suffix_of(p)),
                           key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise UserError(f"{path} holds no {', '.join(SUFFIXES)} files (searched recursively)")
        elif suffix_of(path):
            files = [path]
        else:
            raise UserError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)} or a folder of them")
        self.root, self.files, self.text_field, self.specials = path, files, text_field, list(specials)
        self.label = str(path)
        self._stamps = [[p.relative_to(path).as_posix() if path.is_dir() else p.name, p.stat().st_size,
                         p.stat().st_mtime_ns] for p in files]
        # Names only: a file fixed in place after a bad record keeps the cache folder, and the work done
        # before it; `stamps` tells which files were read and whether they changed since.
        self.key = digest(path, text_field, *(name for name, _, _ in self._stamps))
        self.total = sum(size for _, size, _ in self._stamps)
        self._before = [sum(size for _, size, _ in self._stamps[:i]) for i in range(len(files))]

    def stamps(self) -> list:
        return [list(s) for s in self._stamps]

    def describe(self) -> dict:
        return {"kind": "local", "path": str(self.root), "text_field": self.text_field, "files": len(self.files),
                "bytes": self.total}

    def items(self, file: int = 0, record: int = 0, part: int = 0) -> Iterator[Item]:
        for i in range(file, len(self.files)):
            path = self.files[i]
            reader = {".parquet": self._parquet, ".jsonl": self._jsonl, ".jsonl.zst": self._jsonl,
                      ".txt": self._txt}[suffix_of(path)]
            yield from reader(i, path, record if i == file else 0, part if i == file else 0)

    def _txt(self, i: int, path: Path, record: int, part: int) -> Iterator[Item]:
        if record:
            return  # one record per file, already read
        with open(path, "rb") as fh:
            decoder = codecs.getincrementaldecoder("utf-8")()

            def chunks():
                while True:
                    data = fh.read(_READ)
                    try:
                        text = decoder.decode(data, final=not data)
                    except UnicodeDecodeError as e:
                        at = fh.tell() - len(data) + e.start
                        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {at}); convert it first") from None
                    yield text
                    if not data:
                        return

            for p, piece in enumerate(pieces(chunks(), self.specials)):
                if p >= part:
                    yield Item(piece, p == 0, i, 0, p, self._before[i] + fh.tell())

    def _jsonl(self, i: int, path: Path, record: int, part: int) -> Iterator[Item]:
        field = self.text_field
        with open(path, "rb") as raw:
            if suffix_of(path) == ".jsonl.zst":
                try:
                    import zstandard
                except ImportError:
                    raise UserError(f"reading {path.name} needs zstandard: pip install zstandard") from None
                fh = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
                broken: tuple = (zstandard.ZstdError,)
            else:
                fh, broken = raw, ()
            lineno = 0

            def texts():
                nonlocal lineno
                for lineno, line in enumerate(fh, 1):  # noqa: B007 (read by the error message below)
                    if lineno <= record:
                        continue
                    if not line.strip():
                        yield ""
                        continue
                    try:
                        obj = json.loads(line)
                    except UnicodeDecodeError:
                        raise UserError(f"{path}, line {lineno}: not UTF-8 text") from None
                    except ValueError as e:
                        raise UserError(f"{path}, line {lineno}: not valid JSON ({getattr(e, 'msg', e)}); "
                                        f"expected an object with a '{field}' field") from None
                    if not isinstance(obj, dict) or field not in obj:
                        raise UserError(f"{path}, line {lineno}: no field '{field}' (set data.text_field)")
                    yield _text(obj[field], f"{path}, line {lineno}", field)

            try:
                yield from self._split_records(texts(), i, record, part, lambda: self._before[i] + raw.tell())
            except broken as e:
                raise UserError(f"{path}: corrupt zstd data after line {lineno} ({first_line(e)}); "
                                f"replace the file") from None

    def _parquet(self, i: int, path: Path, record: int, part: int) -> Iterator[Item]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
        field = self.text_field
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read it as parquet ({first_line(e)})") from None
        schema = pf.schema_arrow
        if field not in schema.names:
            raise UserError(f"{path} has no column '{field}' (columns: {', '.join(schema.names)}); "
                            f"set data.text_field")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise UserError(f"{path}: column '{field}' holds {kind}, not text (row 1); set data.text_field")
        meta = pf.metadata
        groups, first, seen = [], 0, 0  # row groups to read: whole ones are skipped on a resume
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if seen + rows > record:
                if not groups:
                    first = seen
                groups.append(g)
            seen += rows
        if not groups:
            return
        size, total_rows = os.path.getsize(path), max(1, meta.num_rows)
        row = first

        def texts():
            nonlocal row
            try:
                for batch in pf.iter_batches(batch_size=_ROWS, row_groups=groups, columns=[field]):
                    for text in batch.column(0).to_pylist():
                        if row >= record:
                            yield text or ""
                        row += 1
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{path}: cannot read row {row + 1} ({first_line(e)})") from None

        # parquet gives no byte position; rows read stand for their share of the file
        yield from self._split_records(texts(), i, record, part,
                                       lambda: self._before[i] + size * min(row, total_rows) // total_rows)


def _text(value, where: str, field: str) -> str:
    if value is None:
        return ""  # missing text is common in scraped sets; one null is not worth stopping for
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' holds {type(value).__name__}, not text")
    return value


# ----------------------------------------------------------------------------- the Hugging Face Hub
class HubSource(EveryNth, Source):
    def __init__(self, spec: str, text_field: str, specials: list[str], val_every: int):
        super().__init__(val_every)
        self.spec, self.text_field, self.specials = spec, text_field, list(specials)
        self.name, self.config, self.split = parse_hf_spec(spec)
        if "[" in self.split:
            raise UserError(f"{spec}: a streamed split cannot be sliced ({self.split}); "
                            f"bound it with data.max_tokens instead")
        self.label, self.total, self.revision = spec, None, None
        self.key = digest(spec, text_field)

    def describe(self) -> dict:
        return {"kind": "hf", "spec": self.spec, "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field, "revision": self.revision}

    def pin(self, revision: str | None = None) -> str | None:
        """Read the dataset at `revision` (a resumed run's), or else at the Hub's current one, looked up
        once (None for a local folder, or when the Hub does not say)."""
        if revision is None and self.revision is not None:
            return self.revision
        import_datasets(self.spec)  # offline, fail in one line now rather than after the Hub client's retries
        if revision is None and not Path(self.name).exists():
            try:
                from huggingface_hub import HfApi

                revision = HfApi().dataset_info(self.name, timeout=30).sha
            except Exception:  # the revision is a record, not a requirement: datasets reports real failures
                revision = None
        self.revision = revision
        return revision

    def items(self, file: int = 0, record: int = 0, part: int = 0) -> Iterator[Item]:
        datasets = import_datasets(self.spec)
        fail = f"cannot stream {self.spec}"
        try:
            kwargs = {"revision": self.revision} if self.revision else {}
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True, **kwargs)
            columns = ds.column_names
        except Exception as e:  # the library's failures (network, missing repo, bad config) are the user's to fix
            raise UserError(f"{fail}: {first_line(e)}") from None
        if columns is not None and self.text_field not in columns:
            raise UserError(f"{self.spec} has no column '{self.text_field}' (columns: {', '.join(columns)}); "
                            f"set data.text_field")
        if record:
            ds = ds.skip(record)
        field, row = self.text_field, record

        def texts():
            nonlocal row
            rows = iter(ds)
            while True:
                try:
                    values = next(rows)
                except StopIteration:
                    return
                except Exception as e:
                    raise UserError(f"{fail} (stopped at row {row + 1}: {first_line(e)}); rerun to resume") from None
                row += 1
                if field not in values:
                    raise UserError(f"{self.spec}, row {row}: no field '{field}' (fields: {', '.join(values)}); "
                                    f"set data.text_field")
                yield _text(values[field], f"{self.spec}, row {row}", field)

        yield from self._split_records(texts(), 0, record, part, lambda: None)


# ----------------------------------------------------------------------------- a split already made
class SplitSource(Source):
    """`sources.get_dataset`'s train.txt and val.txt, val first; records are their documents."""

    def __init__(self, spec: str, specials: list[str], progress: bool = True):
        from scratchlm.data.sources import document_starts, get_dataset

        split = get_dataset(spec, progress=progress)
        self.spec, self.name, self.specials = spec, split.name, list(specials)
        self.files = [split.val, split.train]
        self._docs = [self._ranges(p, document_starts(p)) for p in self.files]
        self.n_val = len(self._docs[0])
        self.label, self.key = spec, digest(split.name, split.train_bytes, split.val_bytes)
        self.total = split.train_bytes + split.val_bytes

    @staticmethod
    def _ranges(path: Path, starts: list[int]) -> list[tuple[int, int]]:
        size = path.stat().st_size
        return list(zip(starts, starts[1:] + [size]))

    def describe(self) -> dict:
        return {"kind": "split", "dataset": self.spec, "cache": self.name,
                "rule": "the dataset's own split (scratchlm data get)"}

    def val_candidate(self, record: int) -> bool:
        return record < self.n_val

    def items(self, file: int = 0, record: int = 0, part: int = 0) -> Iterator[Item]:
        offset = 0
        for i, path in enumerate(self.files):
            if i >= file:
                with open(path, "rb") as fh:
                    for r, (a, b) in enumerate(self._docs[i]):
                        if i == file and r < record:
                            continue
                        for p, piece in enumerate(pieces(_utf8_chunks(fh, a, b), self.specials)):
                            if i == file and r == record and p < part:
                                continue
                            yield Item(piece, p == 0, i, r, p, offset + fh.tell())
            offset += path.stat().st_size
            record = part = 0


def _utf8_chunks(fh, start: int, end: int) -> Iterator[str]:
    """Bytes [start, end) of a file as text, read a megabyte at a time; bad bytes read as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    fh.seek(start)
    left = end - start
    while left > 0:
        data = fh.read(min(_READ, left))
        if not data:
            break
        left -= len(data)
        yield decoder.decode(data)
    yield decoder.decode(b"", final=True)
