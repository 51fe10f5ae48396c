"""The data stage at scale: sources streamed document by document into shards (data/stream.py,
data/ingest.py, data/prepare.py), checked against shards built here by hand from `Tokenizer.encode` of
each record, against a run that was never stopped, and against the textbook BPE trainer."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scratchlm import fetch
from scratchlm.cli import main
from scratchlm.config import build_config
from scratchlm.data import ingest, sources, stream
from scratchlm.data.loader import RandomWindows
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import open_split, read_meta
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer, train_bpe
from scratchlm.tokenizer import bpe
from scratchlm.tokenizer.bpe import train_bpe_on_texts
from test_tokenizer import make_text, naive_train, write
from test_tokenizer_encode import tricky_text

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("offline_cache")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(write(d, make_text(5, 20000, exotic=0.1)), 700, SPECIALS, progress=False)
    Tokenizer(vocab, merges, SPECIALS).save(d / "tokenizer")
    return d / "tokenizer"


def records(seed: int, n: int) -> list[str]:
    """Documents of many lengths, with unicode, two empty ones and two much longer than the rest (the
    second one is the text file of `write_folder`)."""
    out = [make_text(seed * 1000 + i, 5 + (i * 37) % 160, exotic=0.1) for i in range(n)]
    out[3] = out[n // 4 + 1] = ""
    out[7], out[2 * (n // 4)] = make_text(seed, 3000), make_text(seed + 1, 2500)
    return out


def write_folder(root: Path, recs: list[str]) -> Path:
    """The records over one file of each kind, in the order a sorted walk of the folder reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    q = len(recs) // 4
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(recs[:q])))
    (root / "b").mkdir()
    col = [t or None for t in recs[q:2 * q]]  # the empty ones as nulls
    pq.write_table(pa.table({"text": col, "id": list(range(len(col)))}), root / "b" / "c.parquet", row_group_size=7)
    (root / "d.txt").write_text(recs[2 * q], encoding="utf-8", newline="")
    rest = "".join(json.dumps({"text": t}) + "\n" for t in recs[2 * q + 1:])
    try:
        import zstandard
        (root / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rest.encode()))
    except ImportError:
        (root / "e.jsonl").write_text(rest)
    (root / "notes.md").write_text("not a data file: ignored")
    return root


def expected(tok: Tokenizer, recs: list[str], every: int, max_tokens: int = 0, val_tokens: int = 0):
    """The rule of data/stream.py and data/ingest.py, written out again: record i is held out when
    i % every == every - 1; each split is its documents' ids with <eos> between them, cut at its cap;
    held-out records past the validation cap are dropped; everything stops at the train budget."""
    train: list[int] = []
    val: list[int] = []
    val_full = False
    for i, text in enumerate(recs):
        held_out = i % every == every - 1
        if (held_out and val_full) or not text:
            continue
        split, cap = (val, val_tokens) if held_out else (train, max_tokens)
        ids = ([tok.eos_id] if split else []) + tok.encode(text)
        split += ids[:cap - len(split)] if cap else ids
        if cap and len(split) >= cap:
            if not held_out:
                break
            val_full = True
    return train, val


def ids_of(shard_dir: Path, split: str) -> list[int]:
    return [int(x) for a in open_split(shard_dir, split) for x in np.asarray(a)]


def data_config(dataset, *sets: str):
    return build_config({}, [f"data.dataset={dataset}", *sets]).data


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- what the shards hold
def test_a_folder_of_every_format_streams_into_the_expected_shards(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "PIECE_CHARS", 2000)  # the long documents come in pieces
    monkeypatch.setattr(ingest, "BATCH_CHARS", 3000)  # and in many batches
    tok = Tokenizer.load(tok_dir)
    recs = records(1, 60)
    folder = write_folder(tmp_path / "corpus", recs)
    assert len(recs[30]) > 8000 and len(recs[7]) > 8000
    cfg = data_config(folder, f"data.tokenizer={tok_dir}", "data.val_every=5", "data.shard_tokens=1500",
                      "data.workers=2")
    data = prepare(cfg, progress=False)
    train, val = expected(tok, recs, 5)
    assert ids_of(data.shard_dir, "train") == train and ids_of(data.shard_dir, "val") == val

    meta = read_meta(data.shard_dir)
    assert meta == data.meta
    for split, ids in (("train", train), ("val", val)):
        info = meta["splits"][split]
        assert info["tokens"] == len(ids) == sum(s["tokens"] for s in info["shards"])
        assert [s["tokens"] for s in info["shards"][:-1]] == [1500] * (len(info["shards"]) - 1)
        assert info["documents"] == sum(s["documents"] for s in info["shards"]) == ids.count(tok.eos_id) + 1
    assert len(meta["splits"]["train"]["files"]) > 5
    assert meta["records"] == len(recs) and meta["budget"]["reached"] is False
    assert meta["source"]["kind"] == "local" and meta["source"]["files"] == 4
    assert "every 5th record" in meta["validation"]
    # nothing but the shards and meta.json: no copy of the text, no progress file left
    assert sorted(os.listdir(data.shard_dir)) == sorted(meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]
                                                       + ["meta.json"])
    assert not (tmp_path / "cache" / "datasets").exists()


def test_budgets_stop_at_the_exact_token(tok_dir, tmp_path):
    tok = Tokenizer.load(tok_dir)
    recs = records(2, 80)
    folder = write_folder(tmp_path / "corpus", recs)
    cfg = data_config(folder, f"data.tokenizer={tok_dir}", "data.val_every=4", "data.shard_tokens=1000",
                      "data.max_tokens=3e3", "data.val_tokens=700", "data.workers=1")
    data = prepare(cfg, progress=False)
    train, val = expected(tok, recs, 4, max_tokens=3000, val_tokens=700)
    assert len(train) == 3000 and len(val) == 700
    assert ids_of(data.shard_dir, "train") == train and ids_of(data.shard_dir, "val") == val
    assert data.meta["budget"] == {"max_tokens": 3000, "val_tokens": 700, "shard_tokens": 1000, "reached": True}
    assert data.meta["records"] < len(recs)  # it stopped reading


def test_one_and_two_workers_write_the_same_bytes(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_CHARS", 2000)
    folder = write_folder(tmp_path / "corpus", records(3, 60))
    dirs = []
    for workers in (1, 2):
        monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / f"cache{workers}"))
        cfg = data_config(folder, f"data.tokenizer={tok_dir}", "data.val_every=6", "data.shard_tokens=900",
                          f"data.workers={workers}")
        dirs.append(prepare(cfg, progress=False).shard_dir)
    assert dirs[0].name == dirs[1].name
    assert folder_hashes(dirs[0]) == folder_hashes(dirs[1])


# ----------------------------------------------------------------------------- stopping and resuming
class Stop(Exception):
    pass


@pytest.mark.parametrize("where,after", [("write", 8), ("write", 23), ("finish", 2), ("finish", 5)])
def test_a_run_stopped_anywhere_resumes_to_the_same_bytes(tok_dir, tmp_path, monkeypatch, where, after):
    """Stopped after some writes, or just after a shard is renamed into place and before the progress
    record says so; the rerun cuts back to the record and goes on."""
    monkeypatch.setattr(ingest, "BATCH_CHARS", 1500)
    monkeypatch.setattr(ingest, "SAVE_SECONDS", 0.0)
    folder = write_folder(tmp_path / "corpus", records(4, 70))
    sets = [f"data.tokenizer={tok_dir}", "data.val_every=5", "data.shard_tokens=800", "data.workers=1"]
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "straight"))
    straight = prepare(data_config(folder, *sets), progress=False).shard_dir

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "stopped"))
    name = {"write": "write", "finish": "_finish_file"}[where]
    real, calls = getattr(ingest.SplitWriter, name), []

    def stopping(self, *args):
        calls.append(1)
        result = real(self, *args)
        if len(calls) == after:
            raise Stop
        return result

    monkeypatch.setattr(ingest.SplitWriter, name, stopping)
    with pytest.raises(Stop):
        prepare(data_config(folder, *sets), progress=False)
    monkeypatch.setattr(ingest.SplitWriter, name, real)
    out = tmp_path / "stopped" / "shards" / straight.name
    assert (out / ingest.PROGRESS).exists() and not (out / "meta.json").exists()
    read = []
    real_items = stream.LocalSource.items

    def counting(self, *args):
        for item in real_items(self, *args):
            read.append(item)
            yield item

    monkeypatch.setattr(stream.LocalSource, "items", counting)
    prepare(data_config(folder, *sets), progress=False)
    assert folder_hashes(out) == folder_hashes(straight)
    assert read and (read[0].file, read[0].record) > (0, 0)  # it went on from where it stopped


KILLABLE = """
import sys, time
from scratchlm.data import ingest
ingest.SAVE_SECONDS, ingest.BATCH_CHARS = 0.0, 1500
real = ingest._encode_batch
def slow(texts):
    time.sleep(0.03)
    return real(texts)
ingest._encode_batch = slow
from scratchlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_equals_a_run_that_never_stopped(tok_dir, tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "corpus", records(5, 120))
    sets = [f"data.tokenizer={tok_dir}", "data.val_every=5", "data.shard_tokens=700", "data.workers=2"]
    args = ["data", "prepare", "--config", str(Path(__file__).parents[1] / "recipes" / "shakespeare-cpu.toml"),
            "--set", f"data.dataset={folder}", *[x for s in sets for x in ("--set", s)]]
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "straight"))
    assert main(args) == 0
    [straight] = (tmp_path / "straight" / "shards").iterdir()

    env = {**os.environ, "SCRATCHLM_CACHE": str(tmp_path / "killed"), "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "killed" / "shards" / straight.name
    deadline = time.monotonic() + 120
    while len(list(out.glob("train_*.bin"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too, as a machine going down would
    proc.wait()
    assert not (out / "meta.json").exists()
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "killed"))
    assert main(args) == 0
    assert folder_hashes(out) == folder_hashes(straight)


# ----------------------------------------------------------------------------- bad input
def _cli(folder, tok_dir, capsys, *sets) -> tuple[int, str]:
    code = main(["data", "prepare", "--config", str(Path(__file__).parents[1] / "recipes" / "shakespeare-cpu.toml"),
                 "--set", f"data.dataset={folder}", "--set", f"data.tokenizer={tok_dir}", "--set", "data.val_every=3",
                 *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_records_end_in_one_line_naming_the_file_and_row(tok_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = tmp_path / "cases"
    cases.mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), cases / "nofield.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), cases / "numbers.parquet")
    (cases / "mixed.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": 42}\n')
    (cases / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    (cases / "missing.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    (cases / "texts").mkdir()
    (cases / "texts" / "fine.txt").write_text("plain text\n")
    (cases / "texts" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (cases / "notes.csv").write_text("a,b\n")
    wants = {"nofield.parquet": r"nofield\.parquet has no column 'text' \(columns: body\); set data\.text_field$",
             "numbers.parquet": r"numbers\.parquet: column 'text' holds int64, not text \(row 1\)",
             "mixed.jsonl": r"mixed\.jsonl, line 3: field 'text' holds int, not text$",
             "broken.jsonl": r"broken\.jsonl, line 2: not valid JSON",
             "missing.jsonl": r"missing\.jsonl, line 2: no field 'text'",
             "texts": r"latin1\.txt is not UTF-8 text \(bad byte at offset 3\)",
             "notes.csv": r"notes\.csv: unsupported file type"}
    for name, want in wants.items():
        code, line = _cli(cases / name, tok_dir, capsys)
        assert code == 2 and line.startswith("error: ") and str(cases / name) in line, (name, line)
        assert re.search(want, line), (name, line)


def test_corrupt_zstd_is_one_line_and_the_shards_before_it_are_kept(tok_dir, tmp_path, capsys, monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    monkeypatch.setattr(ingest, "BATCH_CHARS", 1500)
    monkeypatch.setattr(ingest, "SAVE_SECONDS", 0.0)
    recs = records(6, 90)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in recs[:60]))
    good = zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in recs[60:]).encode())
    (folder / "b.jsonl.zst").write_bytes(good[:len(good) // 2] + bytes(64) + good[len(good) // 2:])
    code, line = _cli(folder, tok_dir, capsys, "data.shard_tokens=600", "data.workers=1")
    assert code == 2 and line.startswith(f"error: {folder / 'b.jsonl.zst'}: corrupt zstd data") and "replace the file" in line
    [out] = (tmp_path / "cache" / "shards").iterdir()
    kept = {p.name: p.read_bytes() for p in out.glob("train_*.bin")}
    assert len(kept) >= 3 and (out / ingest.PROGRESS).exists()

    # The file replaced by a good one: the rerun goes on from the record of progress (in a.jsonl, or at
    # the start of b.jsonl.zst if it had got there), not from the start.
    saved = json.loads((out / ingest.PROGRESS).read_text())["next"]
    (folder / "b.jsonl.zst").write_bytes(good)
    read = []
    real_items = stream.LocalSource.items

    def counting(self, *args):
        for item in real_items(self, *args):
            read.append((item.file, item.record, item.part))
            yield item

    monkeypatch.setattr(stream.LocalSource, "items", counting)
    code, _ = _cli(folder, tok_dir, capsys, "data.shard_tokens=600", "data.workers=1")
    assert code == 0 and read[0] >= (tuple(saved) if saved[0] == 0 else (1, 0, 0)) and read[0] > (0, 0, 0)
    tok = Tokenizer.load(tok_dir)
    train, val = expected(tok, recs, 3)
    assert ids_of(out, "train") == train and ids_of(out, "val") == val
    assert all((out / name).read_bytes() == data for name, data in kept.items())


def test_a_budget_below_one_shard_is_refused_in_one_line(capsys):
    assert main(["data", "prepare", "--config", str(Path(__file__).parents[1] / "recipes" / "qt-1b.toml"),
                 "--set", "data.max_tokens=2e6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.max_tokens = 2,000,000 is below one shard (data.shard_tokens = " in err


def test_too_few_records_for_a_validation_split_says_what_to_do(tok_dir, tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    with pytest.raises(UserError, match=r"gave no validation text .*: it has too few records; lower data.val_every$"):
        prepare(data_config(path, f"data.tokenizer={tok_dir}"), progress=False)
    data = prepare(data_config(path, f"data.tokenizer={tok_dir}", "data.val_every=10"), progress=False)
    assert data.meta["splits"]["val"]["documents"] == 2


# ----------------------------------------------------------------------------- the tokenizer's sample
def test_the_tokenizer_is_trained_on_a_recorded_sample_of_train_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_CHARS", 3000)
    recs = [make_text(100 + i, 200 + 30 * i, exotic=0.1) for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in recs))
    limit = 25_000
    data = prepare(data_config(path, "data.vocab_size=400", "data.val_every=4", f"data.tokenizer_sample_bytes={limit}",
                               "data.workers=2"), progress=False)
    # the sample by hand: train documents (not every 4th record) in order until the limit is reached
    sample, size = [], 0
    for i, text in enumerate(recs):
        if i % 4 == 3:
            continue
        sample.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    files = [write(tmp_path, t, f"doc{i}.txt") for i, t in enumerate(sample)]
    vocab, merges = train_bpe(files, 400, SPECIALS, progress=False)
    assert Tokenizer.load(data.tokenizer_dir).merges == merges
    record = json.loads((data.tokenizer_dir / "training.json").read_text())
    assert record["sample"]["bytes"] == size and record["sample"]["documents"] == len(sample) < 30
    assert record["sample"]["limit_bytes"] == limit and record["vocab_size"] == 400
    assert record["peak_memory"]["main_mb"] > 0 and record["source"]["kind"] == "local"
    # a second prepare finds both in the cache
    assert prepare(data_config(path, "data.vocab_size=400", "data.val_every=4", f"data.tokenizer_sample_bytes={limit}"),
                   progress=False).shard_dir == data.shard_dir


def test_training_on_texts_equals_training_on_files(tmp_path):
    texts = [make_text(i, 300 + 50 * i, exotic=0.1) for i in range(12)]
    files = [write(tmp_path, t, f"{i}.txt") for i, t in enumerate(texts)]
    batches = [texts[:5], texts[5:6], texts[6:]]
    for uncased in (False, True):
        want = train_bpe(files, 600, SPECIALS, uncased=uncased, progress=False, workers=1)
        assert train_bpe_on_texts(iter(batches), 600, SPECIALS, uncased=uncased, progress=False, workers=2) == want


def test_merges_with_dead_pairs_swept_equal_the_textbook_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(bpe, "_SWEEP", 3)  # sweep and rebuild the heap all the time
    text = make_text(7, 2500)
    path = write(tmp_path, text)
    assert train_bpe(path, 256 + 150, progress=False, workers=1) == naive_train(text, 256 + 150)


def test_encode_array_equals_encode(tok_dir, tmp_path):
    vocab, merges = train_bpe(write(tmp_path, make_text(3, 8000, exotic=0.1)), 500, SPECIALS, uncased=True,
                              progress=False)
    for tok in (Tokenizer.load(tok_dir), Tokenizer(vocab, merges, SPECIALS, uncased=True)):
        for seed in range(4):
            text = tricky_text(seed, 1500) + "<eos>x<bos>\ud800 lone<pad>"
            for dtype in (np.uint16, np.uint32):
                ids = tok.encode_array(text, dtype)
                assert ids.dtype == dtype and ids.tolist() == tok.encode(text)
        assert tok.encode_array("").tolist() == [] and tok.encode_array("<eos>").tolist() == [tok.eos_id]


# ----------------------------------------------------------------------------- other sources
def test_hf_source_streams_local_files_through_datasets(tok_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: None)
    monkeypatch.setattr(ingest, "BATCH_CHARS", 2000)
    monkeypatch.setattr(ingest, "SAVE_SECONDS", 0.0)
    recs = records(8, 48)
    folder = tmp_path / "hub"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [t or None for t in recs[16 * i:16 * (i + 1)]]}), folder / f"part-{i}.parquet")
    seen = []
    real_load = datasets.load_dataset

    def load(*args, **kwargs):
        seen.append(kwargs.get("streaming"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)
    sets = [f"data.tokenizer={tok_dir}", "data.val_every=4", "data.shard_tokens=900", "data.workers=2"]
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "straight"))
    data = prepare(data_config(f"hf:{folder}", *sets), progress=False)
    tok = Tokenizer.load(tok_dir)
    train, val = expected(tok, recs, 4)
    assert ids_of(data.shard_dir, "train") == train and ids_of(data.shard_dir, "val") == val
    assert seen and all(seen) and data.meta["source"]["kind"] == "hf"
    assert not list(Path(tmp_path / "straight").rglob("*.arrow"))

    # stopped part way, it skips the records already written when it streams again
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "stopped"))
    real, calls = ingest.SplitWriter.write, []

    def stopping(self, *args):
        calls.append(1)
        real(self, *args)
        if len(calls) == 9:
            raise Stop

    monkeypatch.setattr(ingest.SplitWriter, "write", stopping)
    with pytest.raises(Stop):
        prepare(data_config(f"hf:{folder}", *sets), progress=False)
    monkeypatch.setattr(ingest.SplitWriter, "write", real)
    again = prepare(data_config(f"hf:{folder}", *sets), progress=False)
    assert folder_hashes(again.shard_dir) == folder_hashes(data.shard_dir)

    with pytest.raises(UserError, match=r"has no column 'body' \(columns: text\); set data.text_field$"):
        prepare(data_config(f"hf:{folder}", *sets, "data.text_field=body"), progress=False)
    with pytest.raises(UserError, match=r"cannot be sliced \(train\[:10%\]\); bound it with data.max_tokens"):
        prepare(data_config(f"hf:{folder}@train[:10%]", *sets), progress=False)


def test_named_corpora_are_listed_and_fail_offline_in_one_line(monkeypatch, capsys):
    assert main(["data", "list"]) == 0
    table = capsys.readouterr().out
    for name, spec, licence in (("tinystories", "hf:roneneldan/TinyStories", "CDLA-Sharing-1.0"),
                                ("openwebtext", "hf:Skylion007/openwebtext", "CC0-1.0"),
                                ("fineweb-edu", "hf:HuggingFaceFW/fineweb-edu:sample-100BT@train", "ODC-By-1.0")):
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert spec in row and licence in row and "text field 'text'" in row
        assert sources.CORPORA[name].spec == spec
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets not installed")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: "Name or service not known")
    assert main(["data", "prepare", "--config", str(Path(__file__).parents[1] / "recipes" / "qt-1b.toml"),
                 "--set", "data.dataset=tinystories"]) == 2
    assert capsys.readouterr().err == ("error: cannot fetch hf:roneneldan/TinyStories from the Hugging Face Hub "
                                       "(no internet?): Name or service not known\n")


def test_small_sets_and_single_text_files_keep_their_own_split(tok_dir, play_text):
    data = prepare(data_config(play_text, f"data.tokenizer={tok_dir}", "data.workers=2"), progress=False)
    split = sources.get_dataset(play_text, progress=False)
    tok = Tokenizer.load(tok_dir)
    assert ids_of(data.shard_dir, "val") == tok.encode(split.val.read_text())
    assert ids_of(data.shard_dir, "train") == tok.encode(split.train.read_text())
    assert "own validation split" in data.meta["validation"]


def test_cli_prepare_prints_where_and_what(tok_dir, tmp_path, capsys):
    folder = write_folder(tmp_path / "corpus", records(9, 40))
    args = ["data", "prepare", "--config", str(Path(__file__).parents[1] / "recipes" / "qt-1b.toml"),
            "--set", f"data.dataset={folder}", "--set", f"data.tokenizer={tok_dir}", "--set", "data.val_every=4",
            "--set", "data.shard_tokens=1000", "--set", "data.max_tokens=4e3", "--set", "data.workers=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train 4,000 tokens in 4 shard(s)" in out and "budget 4,000 train tokens: reached" in out
    assert main(args) == 0 and capsys.readouterr().out == out  # found in the cache


# ----------------------------------------------------------------------------- reading thousands of shards
def test_thousands_of_shards_stay_memory_mapped_under_a_low_file_limit(tok_dir, tmp_path):
    resource = pytest.importorskip("resource")
    recs = [make_text(i, 60) for i in range(400)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in recs))
    data = prepare(data_config(path, f"data.tokenizer={tok_dir}", "data.val_every=50", "data.shard_tokens=20",
                               "data.workers=1"), progress=False)
    n_files = len(data.meta["splits"]["train"]["files"])
    assert n_files > 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4000:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        shards = open_split(data.shard_dir, "train")
        assert len(shards) == n_files and all(isinstance(s, np.memmap) for s in shards)
        tokens = np.concatenate(shards)
        a = RandomWindows(shards, context=8, batch=4, seed=3)
        first = [a.next_batch() for _ in range(5)]
        state = a.state_dict()
        rest = [a.next_batch() for _ in range(5)]
        b = RandomWindows(open_split(data.shard_dir, "train"), context=8, batch=4, seed=0)
        b.load_state_dict(state)
        assert all((x == y).all() and (u == v).all() for (x, u), (y, v) in zip(rest, [b.next_batch() for _ in range(5)]))
        # each window is context + 1 consecutive tokens of one shard
        for x, y in first:
            assert (x[:, 1:] == y[:, :-1]).all()
            for row in x.tolist():
                assert any(tokens[i:i + 8].tolist() == row for i in range(len(tokens) - 7))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_budget_settings_in_the_config():
    cfg = build_config({}, ["data.max_tokens=2e9", "data.val_tokens=1e7", "data.tokenizer_sample_bytes=2e9",
                            "data.workers=16"]).data
    assert (cfg.max_tokens, cfg.val_tokens, cfg.tokenizer_sample_bytes, cfg.workers) == (2 * 10**9, 10**7, 2 * 10**9, 16)
    assert isinstance(cfg.max_tokens, int)
    for bad, want in (("data.max_tokens=2.5", "data.max_tokens must be int"), ("data.val_every=1", ">= 2"),
                      ("data.workers=-1", ">= 0"), ("data.shard_tokens=0", ">= 1"),
                      ("data.max_tokens=inf", "must be int"), ("data.text_field=''", "data.text_field is empty"),
                      ("data.tokenizer_sample_bytes=0", ">= 1"), ("data.workers=1e3", "data.workers must be int")):
        with pytest.raises(UserError, match=re.escape(want)):
            build_config({}, [bad])
