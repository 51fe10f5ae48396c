"""BPE training, checked against a slow trainer written as plainly as possible and a hand-worked example."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import regex

from scratchlm.errors import UserError
from scratchlm.tokenizer import GPT2_SPLIT_PATTERN, normalize_uncased, train_bpe, train_char_vocab, train_word_vocab
from scratchlm.tokenizer.bpe import chunk_ranges, count_pretokens

# Written out again rather than imported, so a typo in the package's copy would show.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will what can "
         "thou thee thy hath doth king queen lord love night day sweet death heart eyes fair "
         "don't it's we'll I've you're she'd they've o'er").split()
EXOTIC = ["café", "naïve", "Ελλάδα", "Привет", "日本語", "中文字符", "😀", "👍🏽", "🇫🇷", "e\u0301", "ß",
          "İstanbul", "١٢٣", "½", "\u00a0", "\u200b", "’tis", "“quoted”", "—", "…", "\t", "\u3000"]


def make_text(seed: int, n_words: int, exotic: float = 0.05) -> str:
    """Varied English-like text with repetition, numbers, punctuation, unicode and odd white space."""
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        r = rng.random()
        if r < exotic:
            out.append(rng.choice(EXOTIC))
        elif r < exotic + 0.03:
            out.append(str(rng.choice([rng.randint(0, 99), rng.randint(0, 10**9), 3.14159, -42])))
        else:
            w = rng.choice(WORDS)
            out.append(w.capitalize() if rng.random() < 0.1 else w.upper() if rng.random() < 0.02 else w)
        sep = rng.random()
        out.append(rng.choice([",", ".", "!", "?", ";", ":", "--", "'", '"']) if sep < 0.12 else "")
        out.append(rng.choice(["\n", "\n\n", "  ", " \n", "\t", "   \n\n  "]) if sep > 0.93 else " ")
    return "".join(out)


def naive_train(text: str, vocab_size: int, specials=(), uncased=False):
    """Textbook BPE: recount every pair of every pre-token after each merge."""
    segments = [text]
    if specials:
        alternation = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        segments = regex.split(alternation, text)
    words = Counter()
    for seg in segments:
        for piece in regex.findall(PATTERN, normalize_uncased(seg) if uncased else seg):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    vocab = [s.encode("utf-8") for s in specials] + [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        new_words = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return dict(enumerate(vocab)), merges


def write(tmp_path, text, name="corpus.txt"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def test_hand_worked_example(tmp_path):
    # Pre-tokens: "low" x1, " low" x2, " lower", " lowest", " newest" x2. Worked out by hand:
    # (l,o) and (o,w) both occur 5 times; the tie goes to the greater pair, (o,w). Then (l,ow) 5,
    # ( ,low) 4, then (e,s) and (s,t) tie at 3 -> (s,t); (e,st) 3; four pairs tie at 2 -> (w,est);
    # then (n,e) beats (e,west) and ( ,n); then (ne,west) beats ( ,ne); finally ( ,newest).
    path = write(tmp_path, "low low low lower lowest newest newest")
    vocab, merges = train_bpe(path, 256 + 9, progress=False)
    assert merges == [(b"o", b"w"), (b"l", b"ow"), (b" ", b"low"), (b"s", b"t"), (b"e", b"st"),
                      (b"w", b"est"), (b"n", b"e"), (b"ne", b"west"), (b" ", b"newest")]
    assert vocab[256 + 8] == b" newest" and vocab[65] == b"A"
    # Asking for more than the corpus can give stops when no pair is left.
    vocab, merges = train_bpe(path, 400, progress=False)
    assert len(vocab) == 256 + len(merges) < 400


@pytest.mark.parametrize("seed,n_words,vocab_size,specials,uncased", [
    (0, 1500, 256 + 120, (), False),
    (1, 1500, 256 + 3 + 100, ("<|endoftext|>", "<pad>", "<|end of text|>"), False),
    (2, 1200, 256 + 1 + 100, ("<|endoftext|>",), True),
])
def test_matches_naive_trainer(tmp_path, seed, n_words, vocab_size, specials, uncased):
    rng = random.Random(seed)
    text = make_text(seed, n_words)
    if specials:  # sprinkle specials, some glued to words, some repeated back to back
        parts = text.split(" ")
        text = " ".join(p + rng.choice(specials) * rng.randint(1, 2) if rng.random() < 0.05 else p for p in parts)
    path = write(tmp_path, text)
    expected = naive_train(text, vocab_size, specials, uncased)
    assert train_bpe(path, vocab_size, specials, uncased=uncased, progress=False, workers=1) == expected
    assert train_bpe([path], vocab_size, specials, uncased=uncased, progress=False, workers=2) == expected


def test_matches_naive_trainer_on_runs_and_repeats(tmp_path):
    """Repeated letters and repeated pairs, where merges touch each other (aaaa, abab, abcabc)."""
    rng = random.Random(9)
    words = ["a" * n for n in range(1, 12)] + ["ab" * n for n in range(1, 8)] + ["aba", "baab", "abcabc", "bbb"]
    words += ["".join(rng.choice("ab") for _ in range(rng.randint(1, 14))) for _ in range(300)]
    text = " ".join(rng.choice(words) for _ in range(3000)) + "\n" + "aaaa" * 50 + " zzz" * 7
    path = write(tmp_path, text)
    for vocab_size in (256 + 5, 256 + 60):
        assert train_bpe(path, vocab_size, progress=False, workers=1) == naive_train(text, vocab_size)


def test_vocab_layout_and_specials_never_merged(tmp_path):
    specials = ["<|endoftext|>", "zzz", "<|a|><|a|>"]
    text = make_text(3, 3000).replace(" the ", " azzzb zzz<|endoftext|>the ")
    vocab, merges = train_bpe(write(tmp_path, text), 256 + 3 + 200, specials, progress=False)
    assert [vocab[i] for i in range(3)] == [s.encode() for s in specials]
    assert [vocab[3 + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert [vocab[259 + k] for k in range(len(merges))] == [a + b for a, b in merges]
    # "zzz" only occurs as a special, so no ordinary token may hold it (or even "zz").
    assert not any(b"zz" in t for i, t in vocab.items() if i >= 3)
    assert not any(b"<|" in a + b and b"|>" in a + b for a, b in merges)


def test_parallel_chunks_count_like_the_whole_text(tmp_path):
    specials = ["<|endoftext|>", "<sep\nsep>"]
    text = make_text(4, 20000, exotic=0.1).replace(" king ", " king<sep\nsep>").replace(" day", "<|endoftext|> day")
    path = write(tmp_path, text)
    ranges = chunk_ranges(str(path), 2000, specials)
    assert len(ranges) > 20 and ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a < b == c for (a, b), (c, _) in zip(ranges, ranges[1:]))
    whole = Counter()
    for i, seg in enumerate(regex.split("(<sep\nsep>|<\\|endoftext\\|>)", text)):
        if i % 2 == 0:
            whole.update(regex.findall(PATTERN, seg))
    assert count_pretokens(path, specials, workers=2, progress=False, chunk_bytes=2000) == whole
    assert count_pretokens(path, specials, workers=1, progress=False, chunk_bytes=1 << 30) == whole
    # Without newlines, chunks are cut before spaces instead.
    one_line = write(tmp_path, text.replace("\n", "\t"), "one_line.txt")
    assert len(chunk_ranges(str(one_line), 2000, specials)) > 20
    counts = count_pretokens(one_line, specials, workers=2, progress=False, chunk_bytes=2000)
    assert counts == count_pretokens(one_line, specials, workers=1, progress=False, chunk_bytes=1 << 30)


def test_files_are_separate_documents(tmp_path):
    a, b = write(tmp_path, "hello wor", "a.txt"), write(tmp_path, "ld again", "b.txt")
    counts = count_pretokens([a, b], progress=False)
    assert counts == Counter(["hello", " wor", "ld", " again"])


def test_training_errors(tmp_path):
    path = write(tmp_path, "some text")
    with pytest.raises(UserError, match="minimum of 257"):
        train_bpe(path, 256, ["<|endoftext|>"], progress=False)
    with pytest.raises(UserError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        train_bpe(bad, 300, progress=False)
    with pytest.raises(UserError, match="repeated special token"):
        train_bpe(path, 300, ["x", "x"], progress=False)


def test_normalize_uncased():
    assert normalize_uncased("Don’t SHOUT “Hello”!") == "don't shout \"hello\"!"
    assert normalize_uncased("café 😀 a+b=c ©\u200b x") == "café  abc  x"
    assert normalize_uncased("e\u0301") == "é"  # combining accent composed, not dropped
    assert normalize_uncased("Line one\n\tLine TWO  ") == "line one\n\tline two  "
    # Per-character lowercasing (as Hugging Face's Lowercase does): no word-final ς from Σ.
    assert normalize_uncased("ΣΊΣΥΦΟΣ 123 ½") == "σίσυφοσ 123 ½"
    assert normalize_uncased("İ ǅ ß") == "i ǆ ß"  # the dot above İ gains in lowering is a mark, dropped


def test_char_and_word_vocabs():
    text = "the cat sat on the mat. the end!"
    chars = train_char_vocab(text)
    assert chars.vocab_size == len(set(text)) + 1 and chars.unk_id == 0
    assert chars.decode(chars.encode(text)) == text
    assert chars.encode("z")[0] == chars.unk_id
    words = train_word_vocab(text, max_size=3)  # "the", then the first of the words seen once
    assert words.vocab_size == 3 and words.id_to_token(1) == "the"
    assert words.decode(words.encode("the cat sat.")) == "the cat <unk> <unk>"
    full = train_word_vocab(text, 100)
    assert full.decode(full.encode(text)) == text
    assert sum(full.token_byte_lengths()[i] for i in full.encode(text)) == len(text.replace(" ", ""))


def test_pattern_is_gpt2():
    assert GPT2_SPLIT_PATTERN == PATTERN
