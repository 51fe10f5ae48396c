"""Properties over arbitrary Unicode text, searched by hypothesis."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer, normalize_uncased, train_bpe
from test_tokenizer import make_text, write

SPECIALS = ["<|endoftext|>", "<|a|>", "<|a|><|a|>", "<eos>"]
# Anything Python can encode as UTF-8: every code point but the surrogates (hypothesis' default).
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("corpus"), make_text(7, 30000, exotic=0.1))
    out = {}
    for uncased in (False, True):
        vocab, merges = train_bpe(path, 800, SPECIALS, uncased=uncased, progress=False)
        out[uncased] = Tokenizer(vocab, merges, SPECIALS, uncased=uncased)
    return out


@PROPERTY
@given(parts=st.lists(st.one_of(ANY_TEXT, st.sampled_from(SPECIALS)), max_size=6))
def test_decode_encode_round_trip(toks, parts):
    tok = toks[False]
    s = "".join(parts)
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(0 <= i < tok.vocab_size for i in ids)


@PROPERTY
@given(s=ANY_TEXT)
def test_uncased_round_trip_gives_the_normalized_text(toks, s):
    tok = toks[True]
    s = s.replace("<", "")  # no special tokens, so normalization covers the whole text
    assert tok.decode(tok.encode(s)) == normalize_uncased(s)


# Characters this Python's Unicode database does not know are left out here: `regex` (the reference path)
# and tiktoken's Rust regex each class them by their own, newer, Unicode tables, which disagree on some.
@PROPERTY
@given(s=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cn"]), max_size=300))
def test_fast_path_equals_reference(toks, s):
    for tok in toks.values():
        assert tok.encode(s) == tok.encode_reference(s)


@PROPERTY
@given(s=st.text(st.characters(codec="utf-8"), max_size=40))
def test_bytes_of_tokens_are_the_text(toks, s):
    """Token boundaries can fall inside a character, but the tokens' bytes always spell the text."""
    tok = toks[False]
    assert b"".join(tok.id_to_bytes(i) for i in tok.encode(s)) == s.encode("utf-8")


@pytest.fixture(scope="module")
def hf_ref(toks, tmp_path_factory):
    """Hugging Face's tokenizer read from the file the cased tokenizer exports."""
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("hf")
    toks[False].save_hf(d)
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


@PROPERTY
@given(parts=st.lists(st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cn"]), max_size=200),
                                st.sampled_from(SPECIALS)), max_size=5))
def test_hf_tokenizers_encodes_the_exported_file_alike(toks, hf_ref, parts):
    s = "".join(parts)
    assert hf_ref.encode(s, add_special_tokens=False).ids == toks[False].encode(s)
