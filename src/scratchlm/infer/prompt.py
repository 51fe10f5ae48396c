"""Plain-text prompts, read the same way by every command: what a user types becomes text (`read_prompt`),
and text becomes the token ids to continue and the ids that end the continuation (`plain_prompt`).
Chat prompts, built from messages, are in `chat/template.py`."""
from __future__ import annotations

import re

from scratchlm.errors import UserError

# The escapes a shell makes awkward to type, read as in a Python string; any other backslash stays as it is.
ESCAPE = re.compile(r"\\(?:([\\nrt])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
SIMPLE = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def read_escapes(text: str, flag: str = "--prompt") -> str:
    r"""`text` with \n, \t, \r, \\, \xHH, \uXXXX and \UXXXXXXXX replaced by what they stand for."""
    def one(m: re.Match) -> str:
        if m[1]:
            return SIMPLE[m[1]]
        code = int(m[2] or m[3] or m[4], 16)
        if code > 0x10FFFF:
            raise UserError(f"{flag}: {m[0]} is past the last Unicode character (\\U0010ffff)")
        return chr(code)

    return ESCAPE.sub(one, text)


def read_prompt(text: str, escapes: bool = True, flag: str = "--prompt") -> str:
    """A prompt as typed on the command line or in a prompts file: escapes read unless `escapes` is
    False, and refused (UserError naming `flag`) unless it is Unicode text that UTF-8 can carry. Text
    from a terminal that is not UTF-8 arrives with its bytes as lone surrogates, which no tokenizer takes."""
    if escapes:
        text = read_escapes(text, flag)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{flag}: character {e.start + 1} is not text (a byte that is not UTF-8, or a lone "
                        f"surrogate such as \\ud800); give the prompt as UTF-8 text") from None
    return text


def plain_prompt(tokenizer, text: str) -> tuple[list[int], tuple[int, ...]]:
    """The token ids of `text`, after bos when the tokenizer puts one in front (`add_bos`), and the stop
    ids of its continuation (`end_ids`). An empty prompt starts from bos, or from a line break for a
    tokenizer without one, since a model needs a token to continue."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = (bos if tokenizer.add_bos else []) + tokenizer.encode(text)
    if not ids:
        ids = bos or tokenizer.encode("\n")
    return ids, end_ids(tokenizer)


def end_ids(tokenizer) -> tuple[int, ...]:
    """Where a plain continuation ends: the tokenizer's stop ids (its eos, and the other end ids its
    model's generation config lists)."""
    return tuple(tokenizer.stop_ids)
