"""The uncased normalisation: one character-by-character map that a Hugging Face normalizer can repeat.

`tokenizer.json` exports describe it with a normalizer sequence (see `tokenizer/hf.py`); training and
encoding call `normalize_uncased`.
"""
from __future__ import annotations

import unicodedata

# Typographic quotes become the ASCII ones so that `don’t` and `don't` share tokens. Capital sigma is
# lowered here, to σ, because `str.lower` alone picks σ or ς by context (Unicode's Final_Sigma rule); taking
# it out of `lower`'s hands makes lowercasing a per-character map, which a Hugging Face normalizer can
# reproduce exactly (see `tokenizer/hf.py`).
BEFORE_LOWER = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u2035": "'",
    "`": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2033": '"', "\u2036": '"', "\u00ab": '"', "\u00bb": '"', "\u2039": "'", "\u203a": "'",
    "\u03a3": "\u03c3",
}
_BEFORE_LOWER = str.maketrans(BEFORE_LOWER)


class _KeepTable(dict):
    """`str.translate` table that keeps letters, digits, punctuation and white space, deleting the rest;
    filled lazily so each distinct character pays for one `unicodedata` lookup."""

    def __missing__(self, code: int):
        ch = chr(code)
        keep = unicodedata.category(ch)[0] in "LNP" or ch.isspace()
        self[code] = code if keep else None
        return self[code]


_KEEP = _KeepTable()


def normalize_uncased(text: str) -> str:
    """Lowercase, straighten curly quotes and drop what is not a letter, digit, punctuation or space.

    NFC first, so that a letter written with a combining accent keeps its accent instead of losing it.
    Lowercasing maps each character on its own: `Σ` always becomes `σ`, never the word-final `ς`.
    """
    return unicodedata.normalize("NFC", text.translate(_BEFORE_LOWER)).lower().translate(_KEEP)
