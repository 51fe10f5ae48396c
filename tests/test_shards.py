"""Token shards: parallel, resumable encoding that equals encoding each document in one go, with <eos>
between documents; checked against `Tokenizer.encode` on the whole text and hand-built expectations."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm import fetch
from scratchlm.data import shards, sources
from scratchlm.data.shards import encode_corpus, open_split, read_meta
from scratchlm.tokenizer import Tokenizer, train_bpe
from test_tokenizer import make_text, write
from test_tokenizer_encode import tricky_text

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|a|>", "<sep\nsep>"]


pytestmark = pytest.mark.usefixtures("offline_cache")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(write(d, make_text(5, 30000, exotic=0.1)), 1000, SPECIALS, progress=False)
    Tokenizer(vocab, merges, SPECIALS).save(d / "tokenizer")
    return d / "tokenizer"


def shard_ids(out, split="train") -> list[int]:
    return np.concatenate([np.asarray(a) for a in open_split(out, split)] or [np.zeros(0)]).astype(np.int64).tolist()


def body(seed: int, n_words: int) -> str:
    """Varied text with specials, including the one holding a newline, where pieces are cut."""
    text = tricky_text(seed, n_words).replace("\ud800", "\ufffd")
    return text.replace("<pad>", "<sep\nsep>")


@pytest.mark.parametrize("workers", [1, 2])
def test_pieces_in_parallel_equal_the_whole_text(tok_dir, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(shards, "PIECE_MIN", 2000)  # many small pieces
    monkeypatch.setattr(shards, "SHARD_TOKENS", 7000)  # and several shard files
    tok = Tokenizer.load(tok_dir)
    text = body(1, 30000)
    path = tmp_path / "one.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces, n_docs = shards.plan_pieces([path], shards.piece_bytes_for(path.stat().st_size), SPECIALS)
    assert len(pieces) > 10 and n_docs == 1
    meta = encode_corpus(tok, tok_dir, {"train": [path]}, tmp_path / "out", progress=False, workers=workers)
    assert shard_ids(tmp_path / "out") == tok.encode(text)
    info = meta["splits"]["train"]
    assert len(info["files"]) > 3 and info["tokens"] == len(tok.encode(text)) and info["documents"] == 1
    assert all(np.fromfile(tmp_path / "out" / f, dtype=np.uint16).size == 7000 for f in info["files"][:-1])
    assert not (tmp_path / "out" / shards.PROGRESS).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(info["files"] + ["meta.json"])


def test_documents_from_records_and_folders(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "PIECE_MIN", 3000)
    tok = Tokenizer.load(tok_dir)
    eos = tok.eos_id
    records = [body(i, 30 + 40 * (i % 7)) for i in range(60)] + ["", "   ", "x"]
    jsonl = tmp_path / "recs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    folder = tmp_path / "books"
    folder.mkdir()
    files = {f"{i:02d}.txt": body(100 + i, 500) for i in range(8)}
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8", newline="")
    meta = shards.encode_sources(tok_dir, [str(jsonl), str(folder)], tmp_path / "out", workers=2, progress=False)
    # Built by hand: records in order (a newline added where one is missing), <eos> between documents.
    docs = [r if r.endswith("\n") else r + "\n" for r in records[:_train_count(len(records))]]
    folder_train = sources.get_dataset(folder, progress=False).train.read_text(encoding="utf-8")
    names = sorted(files)
    book_docs, rest = [], folder_train
    for name in names:
        t = files[name] if files[name].endswith("\n") else files[name] + "\n"
        if not rest.startswith(t):  # the train split ends inside this book
            book_docs.append(rest)
            break
        book_docs.append(t)
        rest = rest[len(t):]
    expected = []
    for i, d in enumerate(docs + book_docs):
        expected += ([eos] if i else []) + tok.encode(d)
    assert shard_ids(tmp_path / "out") == expected
    assert meta["documents"]["separator"] == "eos" and meta["documents"]["eos_id"] == eos
    assert meta["splits"]["train"]["documents"] == len(docs) + len(book_docs)
    val = shard_ids(tmp_path / "out", "val")
    assert val.count(eos) == meta["splits"]["val"]["documents"] - 1 >= 3


def _train_count(n: int) -> int:
    return min(max(int(0.9 * n), 1), n - 1)


def test_eos_between_input_files(tok_dir, tmp_path):
    tok = Tokenizer.load(tok_dir)
    texts = [body(7, 300), "second file\n", "", "third <eos> file"]
    paths = []
    for i, t in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(t, encoding="utf-8", newline="")
    meta = encode_corpus(tok, tok_dir, {"train": paths}, tmp_path / "out", progress=False, workers=1)
    eos = tok.eos_id
    assert shard_ids(tmp_path / "out") == tok.encode(texts[0]) + [eos] + tok.encode(texts[1]) + [eos] + tok.encode(texts[3])
    assert meta["splits"]["train"]["documents"] == 3  # an empty file holds no document


def test_document_offsets_written_by_sources(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab", "cd\n", "é", "f"] * 5))
    split = sources.get_dataset(path, progress=False)
    data = split.train.read_bytes()
    starts = sources.document_starts(split.train)
    assert [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])] == (
        [b"ab\n", b"cd\n", "é\n".encode(), b"f\n"] * 5)[:18]
    raw = split.train.with_suffix(".docs").read_bytes()
    assert struct.unpack(f"<{len(raw) // 8}Q", raw)[:3] == (0, 3, 6)
    assert sources.document_starts(tmp_path / "r.jsonl") == [0]  # no offsets beside it: one document


def test_tokenizer_without_eos_separates_documents_without_a_mark(tmp_path):
    vocab, merges = train_bpe(write(tmp_path, make_text(6, 5000)), 400, ["<pad>"], progress=False)
    tok = Tokenizer(vocab, merges, ["<pad>"])
    tok.save(tmp_path / "tok")
    path = tmp_path / "r.jsonl"
    records = ["one two", "three", " four  ", "five\n\n"] * 10
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    meta = shards.encode_sources(tmp_path / "tok", [str(path)], tmp_path / "out", workers=1, progress=False)
    assert meta["documents"]["separator"] == "none"
    expected = [i for r in records[:36] for i in tok.encode(r if r.endswith("\n") else r + "\n")]
    assert shard_ids(tmp_path / "out") == expected


def test_interrupted_run_resumes_where_it_stopped(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "PIECE_MIN", 2000)
    monkeypatch.setattr(shards, "SHARD_TOKENS", 5000)
    tok = Tokenizer.load(tok_dir)
    text = body(2, 20000)
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    splits = {"train": [path], "val": [path]}
    real, calls = shards._encode_piece, []

    def stop_after(n):
        def encode(piece):
            calls.append(piece)
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(piece)
        return encode

    n_pieces = len(shards.plan_pieces([path], shards.piece_bytes_for(path.stat().st_size), SPECIALS)[0])
    out = tmp_path / "out"
    monkeypatch.setattr(shards, "_encode_piece", stop_after(n_pieces // 2))
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(tok, tok_dir, splits, out, progress=False, workers=1)
    assert not (out / "meta.json").exists() and (out / shards.PROGRESS).exists()
    # A piece's ids written after the last record (as if killed mid-piece) are cut away on resume.
    partial = next(out.glob(".train_*.bin.tmp"))
    with open(partial, "ab") as f:
        f.write(b"\x01\x00" * 77)
    calls.clear()
    monkeypatch.setattr(shards, "_encode_piece", stop_after(10**9))
    meta = encode_corpus(tok, tok_dir, splits, out, progress=False, workers=1)
    assert len(calls) == 2 * n_pieces - n_pieces // 2  # the finished half of train is not redone
    assert shard_ids(out) == shard_ids(out, "val") == tok.encode(text)
    assert meta["splits"]["train"]["tokens"] == len(tok.encode(text))
    calls.clear()
    assert encode_corpus(tok, tok_dir, splits, out, progress=False, workers=1) == meta and calls == []


def test_other_inputs_start_over(tok_dir, tmp_path):
    tok = Tokenizer.load(tok_dir)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(body(3, 3000))
    b.write_text("short text\n")
    encode_corpus(tok, tok_dir, {"train": [a]}, tmp_path / "out", progress=False, workers=1)
    encode_corpus(tok, tok_dir, {"train": [b]}, tmp_path / "out", progress=False, workers=1)
    assert shard_ids(tmp_path / "out") == tok.encode("short text\n")
    assert read_meta(tmp_path / "out")["splits"]["train"]["bytes"] == 11


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(bytes([x]), bytes([y])) for x in range(256) for y in range(256)]  # every byte pair
    vocab.update({256 + k: a + b for k, (a, b) in enumerate(merges)})
    tok = Tokenizer(vocab, merges, ["<eos>"])
    tok.save(tmp_path / "tok")
    path = tmp_path / "t.txt"
    path.write_text("~~ zz~<eos>\n" * 50)
    meta = encode_corpus(tok, tmp_path / "tok", {"train": [path]}, tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32" and open_split(tmp_path / "out", "train")[0].dtype == np.uint32
    ids = shard_ids(tmp_path / "out")
    assert ids == tok.encode("~~ zz~<eos>\n" * 50) and ids[:4] == [256 + 126 * 257, 256 + 32 * 256 + 122, 122, 126]
    assert ids[4] == 65792  # <eos>, after 256 bytes and 65536 pairs


def test_cli_encode_and_rerun(tok_dir, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text(body(4, 4000))
    args = ["tokenizer", "encode", "--tokenizer", str(tok_dir), "--input", str(path), "--out", str(tmp_path / "o"),
            "--workers", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "train:" in first and "val:" in first
    meta = read_meta(tmp_path / "o")
    split = sources.get_dataset(path, progress=False)
    tok = Tokenizer.load(tok_dir)
    assert shard_ids(tmp_path / "o", "val") == tok.encode(split.val.read_text())
    assert main(args) == 0  # a finished folder is left as it is
    assert read_meta(tmp_path / "o") == meta and capsys.readouterr().out == first
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "none"), "--input", str(path), "--out", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: no tokenizer at")


def test_hf_records_are_documents(tok_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    stories = [f"Story {i}: once upon a time" + " there" * (i % 5) for i in range(20)]
    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_dict({"text": stories}))
    meta = shards.encode_sources(tok_dir, ["hf:me/stories"], tmp_path / "out", workers=1, progress=False)
    tok = Tokenizer.load(tok_dir)
    expected = []
    for i, s in enumerate(stories[:18]):
        expected += ([tok.eos_id] if i else []) + tok.encode(s + "\n")
    assert shard_ids(tmp_path / "out") == expected and meta["splits"]["train"]["documents"] == 18
    assert shard_ids(tmp_path / "out", "val") == tok.encode(stories[18] + "\n") + [tok.eos_id] + tok.encode(stories[19] + "\n")
