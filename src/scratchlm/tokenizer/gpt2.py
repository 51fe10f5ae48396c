"""Reading GPT-2's tokenizer files, which spell every byte as a printable character."""
from __future__ import annotations

import json
import os

from scratchlm.errors import UserError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, ...) are moved to U+0100 and up, in byte order, so no token shows white space."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_gpt2_files(vocab_path: str | os.PathLike, merges_path: str | os.PathLike):
    """(vocab id -> bytes, merges, specials str -> id) from `encoder.json`/`vocab.json` and
    `vocab.bpe`/`merges.txt`. Entries that are neither single bytes nor made by a merge
    (`<|endoftext|>`) are the special tokens."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes | None:
        try:
            return bytes(decoder[c] for c in token)
        except KeyError:
            return None

    try:
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise UserError(f"cannot read GPT-2 tokenizer files: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{vocab_path} is not a JSON vocabulary: {e}") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        pair = tuple(to_bytes(p) for p in parts)
        if len(parts) != 2 or None in pair:
            raise UserError(f"{merges_path}:{n}: not a GPT-2 merge line: {line!r}")
        merges.append(pair)
    made = {a + b for a, b in merges}
    vocab, specials = {}, {}
    for token, i in encoder.items():
        b = to_bytes(token)
        if b is None or (len(b) > 1 and b not in made):
            specials[token] = i
            b = token.encode("utf-8")
        vocab[i] = b
    return vocab, merges, specials
