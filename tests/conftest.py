"""Fixtures shared by the test files: an isolated cache, one real Shakespeare download per session, and a
small synthetic corpus for fast end-to-end runs."""
from __future__ import annotations

import random

import pytest
from tiny_chat import one_thread

# The recipe overrides for a training run that takes seconds on a CPU: a two-layer 32-wide model on a
# 300-token vocabulary, float32 so that numbers compare on any CPU, the step budget left to each test.
TINY_RUN = ["train.precision=fp32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32",
            "data.vocab_size=300", "train.micro_batch=4", "train.warmup_steps=2", "train.minutes=0",
            "train.log_every=1", "train.lr=1e-2"]
# Smaller still, for tests that train several runs and keep the recipe's precision and learning rate:
# one 16-wide layer, a 280-token vocabulary.
TINIER = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.context=16", "data.vocab_size=280",
          "train.micro_batch=4", "train.warmup_steps=1", "train.log_every=1"]


def tiny_run(*overrides: str) -> list[str]:
    """`--set` overrides for a tiny run of a recipe; later overrides win over earlier ones."""
    return [*TINY_RUN, *overrides]


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for a test module (see tiny_chat.one_thread for why)."""
    with one_thread():
        yield


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A fresh scratchlm cache for one test, and the Hugging Face Hub off, as on a machine without internet."""
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """A cache directory that lives for the whole session, so the real datasets download once."""
    return tmp_path_factory.mktemp("scratchlm-cache")


@pytest.fixture(scope="session")
def play_text(tmp_path_factory):
    """About 60 kB of play-shaped text (speaker lines and verse) made from a fixed seed."""
    rng = random.Random(0)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR", "TYBALT"]
    words = ("love night day sweet death fair heaven light eyes heart name rose thou thee art "
             "doth hath would shall not the and of to my is in with me").split()
    lines = []
    while sum(len(line) for line in lines) < 60_000:
        lines.append(f"{rng.choice(names)}.")
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + ",")
        lines.append("")
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
