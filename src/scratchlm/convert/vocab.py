"""Tokenizers across formats. GGUF's "gpt2" tokenizer and Hugging Face's byte-level BPE both spell each
token's bytes with GPT-2's printable byte alphabet (`bytes_to_unicode`), and list merges as "a b" with
both halves spelled the same way. Special tokens are the exception: they are stored as their plain text.
"""
from __future__ import annotations

import json
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.gpt2 import spell, unspell, unspell_merge

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def build_tokenizer(tokens: list[str], merges: list[str], special: set[int], source: str) -> tuple[Tokenizer, str]:
    """(tokenizer, note) from GPT-2-spelled tokens (ids are list positions), "a b" merges and the ids that
    are special tokens (kept as their text).

    scratchlm's Tokenizer needs all 256 single bytes, but trained vocabularies can lack the bytes their
    corpus never had (SmolLM2's lacks 21: some control characters and bytes that UTF-8 never uses). Those
    get ids after the source's last one: past the model's embedding table, so a text holding one cannot
    be fed to the model, which is the case in the source too (its tokenizers drop or reject such bytes).
    """
    vocab, specials = {}, {}
    for i, token in enumerate(tokens):
        if i in special:
            vocab[i], specials[token] = token.encode("utf-8"), i
            continue
        data = unspell(token)
        if data is None:
            raise UserError(f"{source}: token {i} ({token!r}) is not byte-level BPE; scratchlm's tokenizer "
                            f"cannot represent this vocabulary")
        vocab[i] = data
    pairs = []
    for m in merges:
        if (pair := unspell_merge(m)) is None:
            raise UserError(f"{source}: merge {m!r} is not a pair of byte-level tokens")
        pairs.append(pair)
    have = set(vocab.values())
    missing = [bytes([x]) for x in range(256) if bytes([x]) not in have]
    for data in missing:
        vocab[len(vocab)] = data
    note = ""
    if missing:
        note = (f"the tokenizer lacks {len(missing)} of the 256 single bytes (first 0x{missing[0][0]:02x}); they "
                f"take ids {len(tokens)}-{len(vocab) - 1}, past the model's vocabulary, as the source has no ids for them")
    try:
        return Tokenizer(vocab, pairs, specials), note
    except ValueError as e:
        raise UserError(f"{source}: the tokenizer cannot be read as byte-level BPE ({e})") from None


def tokenizer_from_gguf(fields: dict, source: str) -> tuple[Tokenizer | None, str]:
    """(tokenizer, note) from a GGUF file's `tokenizer.ggml.*` metadata, read as plain Python values."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        return None, f"tokenizer not imported: GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')"
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    # Padding entries that only round the embedding table up belong to the model, not the tokenizer.
    while tokens and types[-1] == UNUSED:
        tokens.pop()
        types.pop()
    special = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNUSED, UNKNOWN)}
    tok, note = build_tokenizer(tokens, list(fields.get("tokenizer.ggml.merges") or []), special, source)
    pre = fields.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in ("gpt-2", "default"):
        note = "; ".join(filter(None, [note, f"tokenizer pre-tokenization {pre!r} read as GPT-2's, so some texts "
                                             f"(digits, for one) may split differently from llama.cpp's"]))
    return tok, note


def tokenizer_to_gguf(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for GGUF, padded with unused entries up to the model's vocab_size."""
    special_ids = set(tok.special_tokens.values())
    tokens, types = [], []
    vocab = tok.vocab
    beyond = [data for i, data in vocab.items() if i >= vocab_size]
    if any(len(data) != 1 for data in beyond) or special_ids & set(range(vocab_size, len(vocab))):
        raise UserError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size}")
    # Single bytes past the model's vocabulary (see build_tokenizer) have no row to go in; leave them out.
    for i, data in ((i, d) for i, d in vocab.items() if i < vocab_size):
        if i in special_ids:
            tokens.append(data.decode("utf-8"))
            types.append(CONTROL)
        else:
            tokens.append(spell(data))
            types.append(NORMAL)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    merges = [f"{spell(a)} {spell(b)}" for a, b in tok.merges]
    return tokens, types, merges


def tokenizer_from_hf_folder(src: Path) -> tuple[Tokenizer | None, str]:
    """(tokenizer, note) from a Hugging Face folder: `tokenizer.json` of a byte-level BPE, or GPT-2's
    `vocab.json` + `merges.txt`."""
    path = Path(src) / "tokenizer.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} cannot be read: {e}") from None
        model = doc.get("model") or {}
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(doc.get("pre_tokenizer")):
            return None, "tokenizer not imported: tokenizer.json is not a byte-level BPE"
        vocab = model.get("vocab") or {}
        added = {t["id"]: t["content"] for t in doc.get("added_tokens") or []}
        by_id = {i: t for t, i in vocab.items()}
        by_id.update(added)
        if sorted(by_id) != list(range(len(by_id))):
            return None, "tokenizer not imported: its ids are not 0..n-1"
        tokens = [by_id[i] for i in range(len(by_id))]
        tok, note = build_tokenizer(tokens, model.get("merges") or [], set(added), str(path))
        if "Digits" in json.dumps(doc.get("pre_tokenizer")):
            note = "; ".join(filter(None, [note, "tokenizer imported with GPT-2's pre-tokenization; it splits "
                                                 "digits apart, scratchlm does not"]))
        return tok, note
    vocab_json, merges_txt = Path(src) / "vocab.json", Path(src) / "merges.txt"
    if vocab_json.is_file() and merges_txt.is_file():
        return Tokenizer.from_gpt2_files(vocab_json, merges_txt), ""
    return None, "no tokenizer found (tokenizer.json, or vocab.json with merges.txt)"
