"""Character- and word-level vocabularies, for teaching: what BPE improves on.

Both map anything unseen to `<unk>` (id 0), which is why byte-level BPE, which never needs one, wins.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?')\]}])")
UNK = "<unk>"


class SimpleTokenizer:
    """A fixed list of tokens (chars or words) with `<unk>` as id 0; same basic API as `Tokenizer`."""

    def __init__(self, tokens: Iterable[str], level: str):
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', not {level!r}")
        self.level = level
        self._tokens = [UNK, *(t for t in tokens if t != UNK)]
        self._ids = {t: i for i, t in enumerate(self._tokens)}

    def _split(self, text: str) -> list[str]:
        return list(text) if self.level == "char" else _WORD_RE.findall(text)

    def encode(self, text: str) -> list[int]:
        get = self._ids.get
        return [get(t, 0) for t in self._split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        tokens = [self._tokens[i] for i in ids]
        if self.level == "char":
            return "".join(tokens)
        # Word level forgets the spacing; rejoin with spaces, glued to closing punctuation.
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(tokens))

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {UNK: 0}

    unk_id = 0
    bos_id = eos_id = pad_id = chat_template = None
    add_bos, stop_ids = False, ()

    def token_to_id(self, token: str) -> int:
        return self._ids[token]

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 length of each token (0 for `<unk>`); word tokens do not count the spaces between them."""
        return [0, *(len(t.encode("utf-8")) for t in self._tokens[1:])]

    def __repr__(self) -> str:
        return f"SimpleTokenizer(level={self.level!r}, vocab_size={self.vocab_size})"


def train_char_vocab(text: str) -> SimpleTokenizer:
    """One token per distinct character of `text` (sorted), plus `<unk>`."""
    return SimpleTokenizer(sorted(set(text)), "char")


def train_word_vocab(text: str, max_size: int) -> SimpleTokenizer:
    """The `max_size - 1` most frequent words and punctuation marks of `text`, plus `<unk>`."""
    if max_size < 1:
        raise ValueError("max_size must be at least 1 (for <unk>)")
    counts = Counter(_WORD_RE.findall(text))
    return SimpleTokenizer([w for w, _ in counts.most_common(max_size - 1)], "word")
