"""The Tokenizer: fast path == reference path, round trips, special tokens, streaming, save/load."""
from __future__ import annotations

import io
import json
import pickle
import random

import numpy as np
import pytest

from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer, normalize_uncased, train_bpe
from test_tokenizer import EXOTIC, make_text, write

SPECIALS = ["<|endoftext|>", "<|a|>", "<|a|><|a|>", "<sep\nsep>", "<bos>", "<eos>", "<pad>", "<|end of text|>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2000-token vocab trained on ~400 KB of varied text, cased and uncased."""
    path = write(tmp_path_factory.mktemp("corpus"), make_text(10, 80000, exotic=0.08))
    out = {}
    for uncased in (False, True):
        vocab, merges = train_bpe(path, 2000, SPECIALS, uncased=uncased, progress=False)
        out[uncased] = Tokenizer(vocab, merges, SPECIALS, uncased=uncased)
    return out


def tricky_text(seed: int, n_words: int) -> str:
    """Text the tokenizer was not trained on, with specials (also overlapping and back to back)."""
    rng = random.Random(seed)
    parts = make_text(seed, n_words, exotic=0.15).split(" ")
    extras = SPECIALS + ["<|a|><|a|><|a|>", "<|endoftext", "<sep\n", "\ud800", "\x00\x01", "  \n \n\n\t"]
    return " ".join(p + rng.choice(extras) if rng.random() < 0.04 else p for p in parts) + " ".join(EXOTIC)


@pytest.mark.parametrize("uncased", [False, True])
def test_fast_path_equals_reference(trained, uncased):
    tok = trained[uncased]
    assert tok._tiktoken() is not None, "trained vocab should take the tiktoken path"
    text = tricky_text(20, 60000)
    fast, ref = tok.encode(text), tok.encode_reference(text)
    assert fast == ref
    for piece in text[:20000].split("\n"):  # and piece by piece, where edges differ
        assert tok.encode(piece) == tok.encode_reference(piece)


@pytest.mark.parametrize("uncased", [False, True])
def test_round_trip(trained, uncased):
    tok = trained[uncased]
    text = tricky_text(21, 20000).replace("\ud800", "")  # a lone surrogate cannot survive UTF-8
    expected = text
    if uncased:  # normalization applies around the specials, never to them
        expected = "".join(p if i % 2 else normalize_uncased(p)
                           for i, p in enumerate(tok._special_re.split(text)))
    assert tok.decode(tok.encode(text)) == expected
    for s in EXOTIC + ["", " ", "\n\n\n", "a" * 1000, "🇫🇷" * 50]:
        assert tok.decode(tok.encode(s)) == (normalize_uncased(s) if uncased else s)


def test_lone_surrogate_reads_as_replacement_char(trained):
    tok = trained[False]
    assert tok.encode("a\ud800b") == tok.encode_reference("a\ud800b") == tok.encode("a\ufffdb")


def test_decode_invalid_utf8_gives_replacement_char(trained):
    tok = trained[False]
    lead = tok._encoder["é".encode()[:1]]  # first byte of a two-byte character, alone
    assert tok.decode([tok._encoder[b"\xff"]]) == "\ufffd"
    assert tok.decode([tok._encoder[b"a"], lead, tok._encoder[b"b"]]) == "a\ufffdb"
    assert tok.decode([]) == ""
    assert tok.decode(np.array(tok.encode("hi there"))) == "hi there"
    # Ids outside the vocabulary (a padded output layer can sample them) also read as U+FFFD ...
    assert tok.decode([tok._encoder[b"a"], tok.vocab_size, -1]) == "a\ufffd\ufffd"
    with pytest.raises(ValueError):  # ... except where asked to be strict.
        tok.decode_bytes([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode_bytes([-1])


def test_special_tokens(trained):
    tok = trained[False]
    ids = tok.special_tokens
    assert ids == {s: i for i, s in enumerate(SPECIALS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (4, 5, 6, None)
    a, aa = ids["<|a|>"], ids["<|a|><|a|>"]
    assert tok.encode("<|a|><|a|><|a|>") == [aa, a]  # longest match wins, leftmost first
    assert tok.encode("x<|a|><|a|>y")[1] == aa
    assert tok.encode("<sep\nsep>") == [ids["<sep\nsep>"]]
    eot = ids["<|endoftext|>"]
    assert tok.encode("end<|endoftext|>start").count(eot) == 1
    # No ordinary token contains a special token's text.
    for i in range(len(SPECIALS), tok.vocab_size):
        assert not any(s.encode() in tok.id_to_bytes(i) for s in SPECIALS)
    assert tok.token_byte_lengths()[:len(SPECIALS)] == [0] * len(SPECIALS)
    text = "some text, with<|endoftext|>special tokens"
    assert sum(tok.token_byte_lengths()[i] for i in tok.encode(text)) == len(text.encode()) - len("<|endoftext|>")


def test_specials_found_without_being_named(trained):
    tok = trained[False]
    assert Tokenizer(tok.vocab, tok.merges).special_tokens == tok.special_tokens


def test_specials_added_when_missing_from_vocab():
    vocab = {i: bytes([i]) for i in range(256)}
    tok = Tokenizer(vocab, [], ["<eos>", "a"])
    assert tok.vocab_size == 258 and tok.special_tokens == {"<eos>": 256, "a": 257}
    assert tok.encode("ba<eos>") == [98, 257, 256]
    assert tok.token_to_id("<eos>") == 256 and tok.token_to_id("b") == 98
    with pytest.raises(KeyError):
        tok.token_to_id("nope")


@pytest.mark.parametrize("buffer_chars", [1, 37, 1 << 16])
def test_encode_iterable_equals_encode(trained, tmp_path, buffer_chars):
    for tok in trained.values():
        text = tricky_text(22, 15000).replace("\ud800", "?")
        expected = tok.encode(text)
        path = tmp_path / "t.txt"
        path.write_text(text, encoding="utf-8", newline="")
        with open(path, encoding="utf-8", newline="") as f:
            assert list(tok.encode_iterable(f, buffer_chars=buffer_chars)) == expected
        # Random-sized pieces cut words, specials and white-space runs anywhere.
        rng, pieces, i = random.Random(buffer_chars), [], 0
        while i < len(text):
            n = rng.randint(1, 300)
            pieces.append(text[i:i + n])
            i += n
        assert list(tok.encode_iterable(iter(pieces), buffer_chars=buffer_chars)) == expected
    assert list(tok.encode_iterable(io.StringIO(""))) == []


def test_encode_file_and_batch(trained, tmp_path):
    tok = trained[False]
    text = tricky_text(23, 5000).replace("\ud800", "?")
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    arr = tok.encode_file(path)
    assert arr.dtype == np.uint16 and arr.tolist() == tok.encode(text)
    texts = text.split("\n")
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_round_trip(trained, tmp_path):
    for uncased, tok in trained.items():
        d = tmp_path / f"tok{uncased}"
        tok.save(d)
        assert sorted(p.name for p in d.iterdir()) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
        doc = json.loads((d / "tokenizer.json").read_text())  # Hugging Face's format (see test_tokenizer_hf)
        assert (doc["normalizer"] is not None) is uncased
        assert doc["added_tokens"][0]["content"] == "<|endoftext|>" and doc["added_tokens"][0]["id"] == 0
        back = Tokenizer.load(d)
        assert back.vocab == tok.vocab and back.merges == tok.merges and back.uncased == uncased
        assert back.special_tokens == tok.special_tokens
        text = tricky_text(24, 3000)
        assert back.encode(text) == tok.encode(text)
        assert Tokenizer.load(d / "tokenizer.json").vocab_size == tok.vocab_size
    clone = pickle.loads(pickle.dumps(trained[False]))
    assert clone.encode("Hello<|endoftext|>") == trained[False].encode("Hello<|endoftext|>")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UserError, match="bad"):
        Tokenizer.load(bad)
    for content in ["{not json", '{"format": "other"}', '{"format": "scratchlm-bpe", "vocab": ["zz"]}',
                    '{"format": "scratchlm-bpe", "vocab": [], "merges": [], "special_tokens": {}}']:
        (bad / "tokenizer.json").write_text(content)
        with pytest.raises(UserError, match="malformed tokenizer file .*bad"):
            Tokenizer.load(bad)


def test_unreachable_merges_fall_back_to_reference():
    # "abc" is made from (ab, c), yet bc merges first, so BPE leaves "abc" as [a, bc]; tiktoken's
    # rule would join a + bc into "abc". The tokenizer must notice and stay on the reference path.
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")]
    vocab.update({256: b"bc", 257: b"ab", 258: b"abc"})
    tok = Tokenizer(vocab, merges)
    assert tok._tiktoken() is None
    assert tok.encode("abc") == tok.encode_reference("abc") == [97, 256]


def test_reachability_check_matches_brute_force():
    rng = random.Random(5)
    seen_both = set()
    for _ in range(400):
        tokens, merges = [bytes([c]) for c in b"abc"], []
        for _ in range(rng.randint(1, 10)):
            a, b = rng.choice(tokens), rng.choice(tokens)
            if a + b not in tokens:
                merges.append((a, b))
                tokens.append(a + b)
        vocab = {i: bytes([i]) for i in range(256)}
        vocab.update({256 + k: a + b for k, (a, b) in enumerate(merges)})
        tok = Tokenizer(vocab, merges)
        brute = all(tok._bpe(a + b) == [tok._encoder[a + b]] for a, b in merges)
        assert tok._all_reachable() == brute, merges
        seen_both.add(brute)
        if brute:
            for _ in range(5):
                s = "".join(rng.choice("abc") for _ in range(rng.randint(1, 25)))
                assert tok.encode(s) == tok.encode_reference(s), (merges, s)
    assert seen_both == {True, False}
