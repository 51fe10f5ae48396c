"""Pre-tokenization shared by training and encoding: the GPT-2 split pattern, special-token splitting,
and where a long text may be cut into pieces that tokenize exactly as the whole would.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import regex

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_SPLIT_PATTERN)

# A cut is made just before a space or newline whose left neighbour is one of these. Such a neighbour
# always ends a pre-token, is never white space under any definition (Python's, `regex`'s, Rust's), and
# survives `normalize_uncased` as a non-space character, so both sides of the cut pre-tokenize (and
# normalize) exactly as they would inside the whole text. Restricted to ASCII so the byte-level search
# used by training agrees with the string search used by encoding.
_SAFE_LEFT = frozenset(
    c for c in map(chr, range(0x21, 0x7F)) if unicodedata.category(c)[0] in "LNP"
)
_SAFE_LEFT_BYTES = frozenset(ord(c) for c in _SAFE_LEFT)
_CUT_BEFORE = ("\n", " ")


def check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens as a list, rejecting empty or repeated ones."""
    out = list(special_tokens or ())
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"repeated special token in {out}")
    return out


def special_regex(special_tokens: Iterable[str]) -> re.Pattern | None:
    """A pattern whose `split` keeps the specials; longest first so that, of the specials starting at the
    leftmost match, the longest one wins (`<|a|><|a|>` over `<|a|>`)."""
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


def split_specials(text: str, special_re: re.Pattern | None) -> list[str]:
    """`[plain, special, plain, special, ..., plain]`: odd positions hold special tokens."""
    return [text] if special_re is None else special_re.split(text)


def _straddles(buf, i: int, specials) -> bool:
    """Whether an occurrence of a special (str or bytes, like `buf`) may cover both buf[i-1] and buf[i];
    one cut short by the end of `buf` counts, since the rest may follow."""
    for s in specials:
        for j in range(max(0, i - len(s) + 1), i):
            if s.startswith(buf[j:j + len(s)]):
                return True
    return False


def find_cut(text: str, specials: Iterable[str] = ()) -> int:
    """The last index `i > 0` where `text[:i]` and `text[i:]` can be encoded separately; 0 if none.

    A special token can only cover the cut if it contains the space or newline found at `text[i]`; such
    specials are checked, counting one cut short by the end of `text` (more text may follow).
    """
    specials = [s for s in specials if "\n" in s or " " in s]
    for sep in _CUT_BEFORE:
        i = len(text)
        while True:
            i = text.rfind(sep, 1, i)
            if i <= 0:
                break
            if text[i - 1] in _SAFE_LEFT and not (specials and _straddles(text, i, specials)):
                return i
    return 0


def find_cut_bytes(buf: bytes, start: int, end: int, specials: Iterable[bytes] = ()) -> int:
    """The first cut in `buf[start:end]` of UTF-8 bytes (same rule as `find_cut`), or -1 if none.

    Prefers cutting before a newline, so lines stay whole; falls back to a space for text without
    newlines. `buf` should extend past `end` by the longest special's length so specials can be seen.
    """
    specials = [s for s in specials if b"\n" in s or b" " in s]
    for sep in b"\n ":
        i = max(start, 1) - 1
        while (i := buf.find(sep, i + 1, end)) != -1:
            if buf[i - 1] in _SAFE_LEFT_BYTES and not (specials and _straddles(buf, i, specials)):
                return i
    return -1
