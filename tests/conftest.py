"""Fixtures shared by the test files: an isolated cache, one real Shakespeare download per session, and a
small synthetic corpus for fast end-to-end runs."""
from __future__ import annotations

import random

import pytest


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
