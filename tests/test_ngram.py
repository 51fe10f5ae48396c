"""The Kneser-Ney n-gram baseline: a distribution over the whole vocabulary for every context, the
probabilities of a tiny corpus worked out by hand, and `scratchlm eval --baseline ngram`."""
from __future__ import annotations

import math

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.eval.ngram import KneserNey

A, B, C = 0, 1, 2
CORPUS = [A, B, A, B, C, A]   # "a b a b c a"


def test_probabilities_sum_to_one_over_the_vocabulary():
    rng = np.random.default_rng(0)
    # A skewed random corpus, so that some contexts are frequent, some rare and some never seen.
    tokens = rng.choice(20, size=3000, p=np.arange(1, 21) / 210)
    for order in (1, 2, 3, 4):
        model = KneserNey(order, vocab_size=23).fit(tokens)      # ids 20-22 never occur
        histories = [[], [19], [5, 5], [0, 1, 2], [22, 21, 20], list(tokens[100:103]), [-1, -1, 7]]
        for h in histories:
            p = model.distribution(h)
            assert p.shape == (23,) and (p > 0).all()
            assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_bigram_probabilities_by_hand():
    # Bigrams: (a b) x2, (b a), (b c), (c a). Lower order counts continuations: a follows b and c (2),
    # b follows a (1), c follows b (1); 4 in all, 3 kinds. With D = 1/2:
    #   P1(a) = (2 - 1/2 + 1/2 * 3/3) / 4 = 1/2,  P1(b) = P1(c) = (1 - 1/2 + 1/2) / 4 = 1/4
    #   P(b | a) = (2 - 1/2) / 2 + (1/2 * 1 / 2) * P1(b) = 3/4 + 1/16 = 13/16
    #   P(a | b) = (1 - 1/2) / 2 + (1/2 * 2 / 2) * P1(a) = 1/4 + 1/4 = 1/2
    #   P(a | c) = (1 - 1/2) / 1 + (1/2 * 1 / 1) * P1(a) = 3/4
    m = KneserNey(2, vocab_size=3, discount=0.5).fit(CORPUS)
    assert m.distribution([]) == pytest.approx([1 / 2, 1 / 4, 1 / 4])   # no history: the lower order
    assert m.distribution([A]) == pytest.approx([1 / 8, 13 / 16, 1 / 16])
    assert m.distribution([B]) == pytest.approx([1 / 2, 1 / 8, 3 / 8])
    assert m.distribution([C]) == pytest.approx([3 / 4, 1 / 8, 1 / 8])


def test_trigram_probabilities_by_hand():
    # Trigrams (a b a), (b a b), (a b c), (b c a), once each. The bigram level now counts continuations:
    # every bigram has one kind of left neighbour, so c(a b) = c(b a) = c(b c) = c(c a) = 1. With D = 1/2:
    #   P2(a | b) = (1/2 + 1/2 * 2 * P1(a)) / 2 = 1/2,   P2(c | b) = (1/2 + 1 * 1/4) / 2 = 3/8,   P2(b | b) = 1/8
    #   P2(b | a) = 1/2 + 1/2 * P1(b) = 5/8
    #   P(a | a b) = (1/2 + 1/2 * 2 * P2(a | b)) / 2 = 1/2,  P(c | a b) = (1/2 + 3/8) / 2 = 7/16,  P(b | a b) = 1/16
    #   P(b | b a) = 1/2 + 1/2 * P2(b | a) = 13/16
    m = KneserNey(3, vocab_size=3, discount=0.5).fit(CORPUS)
    assert m.distribution([A, B]) == pytest.approx([1 / 2, 1 / 16, 7 / 16])
    assert m.distribution([B, A])[B] == pytest.approx(13 / 16)
    assert m.distribution([C, B]) == pytest.approx([1 / 2, 1 / 8, 3 / 8])   # unseen context: P2( . | b)
    assert m.distribution([B]) == pytest.approx([1 / 2, 1 / 8, 3 / 8])      # a short history: the same


def test_discounts_by_neys_estimate():
    # Bigram counts 2, 1, 1, 1: n1 = 3, n2 = 1, D = 3 / (3 + 2). Unigram continuations 2, 1, 1: D = 2 / (2 + 2).
    m = KneserNey(2, vocab_size=3).fit(CORPUS)
    assert m.discount == pytest.approx({1: 0.5, 2: 0.6})


def test_evaluate_scores_every_target_with_its_history_and_counts_bytes():
    rng = np.random.default_rng(1)
    train, val = rng.integers(0, 12, 2000), rng.integers(0, 12, 300)
    lengths = rng.integers(1, 4, 12)
    m = KneserNey(3, 12).fit(train)
    by_hand = -sum(math.log(m.distribution(val[max(0, t - 2):t])[val[t]]) for t in range(1, len(val)))
    for chunk in (7, 1 << 20):  # scoring in pieces changes nothing
        row = m.evaluate([val], lengths, chunk=chunk)
        assert row["val_tokens"] == len(val) - 1 and row["val_bytes"] == lengths[val[1:]].sum()
        assert row["val_loss"] == pytest.approx(by_hand / (len(val) - 1))
        assert row["val_bpb"] == pytest.approx(by_hand / math.log(2) / lengths[val[1:]].sum())
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))


def test_mistakes():
    with pytest.raises(UserError, match="highest order for this vocabulary is 4"):
        KneserNey(5, 50257)
    with pytest.raises(UserError, match="order 1 or more"):
        KneserNey(0, 10)
    with pytest.raises(UserError, match="outside a 3-token vocabulary"):
        KneserNey(2, 3).fit([0, 1, 5])


def test_baseline_command(play_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    from scratchlm.tokenizer import Tokenizer

    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<eos>"]).save(tmp_path / "tok")  # one token per byte
    assert main(["eval", "--baseline", "ngram", "--order", "3", "--tokenizer", str(tmp_path / "tok"),
                 "--data", str(play_text)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("3-gram Kneser-Ney, trained on")
    assert lines[-1].startswith(f"{play_text} val: loss") and "bits per byte" in lines[-1]
    loss = float(lines[-1].split("loss ")[1].split(",")[0])
    bpb = float(lines[-1].split("bits per byte ")[1].split()[0])
    assert 0 < bpb < 8
    assert bpb == pytest.approx(loss / math.log(2), abs=2e-4)   # a token is a byte here
