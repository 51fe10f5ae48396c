"""Hugging Face interchange: a `Tokenizer` as a `tokenizer.json` that `tokenizers` and `transformers` load,
and such a file read back.

The file describes a byte-level BPE the way Hugging Face writes GPT-2's: a ByteLevel pre-tokenizer (GPT-2's
pattern, no prefix space), a BPE model whose tokens and "a b" merges are spelled in GPT-2's byte alphabet,
and the special tokens as added tokens matched on the raw text before anything else. An uncased tokenizer
gets a normalizer sequence that computes exactly `normalize_uncased`:

    replace (quotes, Σ) -> NFC -> drop -> Lowercase -> drop

where "drop" deletes every character outside an explicit list of code point ranges (letters, digits,
punctuation and white space by this Python's Unicode database), so no regex engine's idea of `\\p{L}`
is involved. The first drop is needed because Rust's lowercasing knows newer Unicode than Python's
does: it would turn a capital letter unassigned in Python's database (so dropped here) into an assigned
small one. Dropping before lowering changes nothing else, because no dropped character lowers into a kept
one (a test checks all of Unicode).

What still differs comes from Unicode versions, and is pinned down by the tests: characters unassigned in
this Python's Unicode database may be classed differently by the regex engines (Oniguruma in `tokenizers`,
`regex` here), and `tokenizers`' NFC tables predate about a hundred combining marks (Unicode 11 and
later), so in uncased mode a sequence of several combining marks that includes one of them may compose
differently. Everything else encodes identically.
"""
from __future__ import annotations

import functools
import unicodedata
from collections.abc import Mapping

from scratchlm.errors import UserError
from scratchlm.tokenizer.gpt2 import spell, unspell, unspell_merge
from scratchlm.tokenizer.normalize import BEFORE_LOWER

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


# ----------------------------------------------------------------------------- uncased normalizer
@functools.cache
def _kept_class() -> str:
    """A regex class of the characters `normalize_uncased` keeps, as explicit code point ranges."""
    ranges, start = [], None
    for cp in range(0x110001):
        ch = chr(cp) if cp < 0x110000 else ""
        keep = bool(ch) and not 0xD800 <= cp < 0xE000 and (
            unicodedata.category(ch)[0] in "LNP" or ch.isspace())
        if keep and start is None:
            start = cp
        elif not keep and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


def _replace(pattern: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"Regex": pattern}, "content": content}


def uncased_normalizer() -> dict:
    """The normalizer that computes `normalize_uncased` (see the module docstring)."""
    groups: dict[str, list[str]] = {}
    for src, dst in BEFORE_LOWER.items():
        groups.setdefault(dst, []).append(src)
    steps = [_replace("[" + "".join(f"\\x{{{ord(c):X}}}" for c in srcs) + "]", dst) for dst, srcs in groups.items()]
    drop = _replace(f"[^{_kept_class()}]", "")
    steps += [{"type": "NFC"}, drop, {"type": "Lowercase"}, drop]
    return {"type": "Sequence", "normalizers": steps}


def _is_uncased_normalizer(norm) -> bool:
    """Whether `norm` is our uncased normalizer. The drop classes are not compared, since they depend on
    the Unicode version of the Python that wrote the file; the rest must match exactly."""
    ours = uncased_normalizer()["normalizers"]
    theirs = norm.get("normalizers") if isinstance(norm, dict) and norm.get("type") == "Sequence" else None
    if not isinstance(theirs, list) or len(theirs) != len(ours):
        return False
    for a, b in zip(ours, theirs):
        if a["type"] == "Replace" and a["content"] == "" and isinstance(b, dict):
            if b.get("type") != "Replace" or b.get("content") != "" or \
                    not str((b.get("pattern") or {}).get("Regex", "")).startswith("[^"):
                return False
        elif a != b:
            return False
    return True


# ----------------------------------------------------------------------------- export
def to_hf_dict(tok) -> dict:
    """The `tokenizer.json` document for `tok`; UserError when the format cannot say the same thing."""
    specials = tok.special_tokens
    special_ids = set(specials.values())
    vocab: dict[str, int] = {}
    for i, data in tok.vocab.items():
        if i in special_ids:
            continue
        key = spell(data)
        if key in vocab:
            raise UserError(f"cannot write a Hugging Face tokenizer.json: tokens {vocab[key]} and {i} have the "
                            f"same bytes {data!r}, and the format maps each token to one id")
        vocab[key] = i
    for s, i in specials.items():
        # Hugging Face looks an added token up in the model's vocabulary by its text to find its id, so the
        # text goes in as is; it must not be the spelling of an ordinary token too.
        if s in vocab:
            raise UserError(f"cannot write a Hugging Face tokenizer.json: special token {s!r} is spelled like "
                            f"ordinary token {vocab[s]}; rename the special token")
        vocab[s] = i
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(specials.items(), key=lambda x: x[1])]
    # As in GPT-2's file: the post-processor only adjusts offsets and adds no tokens, unless bos goes in
    # front; transformers reads that from here alone, not from add_bos_token, when tokenizer.json exists.
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if tok.add_bos and tok.bos_id is not None:
        post = {"type": "Sequence", "processors": [post, bos_template(tok.token_name(tok.bos_id), tok.bos_id)]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": uncased_normalizer() if tok.uncased else None,
        "pre_tokenizer": dict(BYTE_LEVEL),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
            "merges": [f"{spell(a)} {spell(b)}" for a, b in tok.merges],
        },
    }


def bos_template(name: str, i: int) -> dict:
    """A post-processor that puts token `name` (id `i`) in front of every text."""
    bos = {"SpecialToken": {"id": name, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name: {"id": name, "ids": [i], "tokens": [name]}}}


def leading_token(doc: Mapping) -> str | None:
    """The special token a tokenizer.json's post-processor puts in front of every text, if any."""
    post = doc.get("post_processor")
    steps = post.get("processors") if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [None])[0]
            if isinstance(first, dict) and isinstance(first.get("SpecialToken"), dict):
                return first["SpecialToken"].get("id")
    return None


def tokenizer_config(tok) -> dict:
    """`tokenizer_config.json`, so `transformers.AutoTokenizer` can load the folder with the same special
    tokens and chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000_000, **settings_config(tok)}


# ----------------------------------------------------------------------------- special-token roles
ROLES = ("bos", "eos", "pad", "unk")
EOS_LIST_KEY = "scratchlm_eos_list"  # a generation_config's list of end ids, which no tokenizer key holds


def settings_config(tok) -> dict:
    """The special-token roles, add_bos, eos list and chat template of `tok` under Hugging Face's
    tokenizer_config.json keys (and one of scratchlm's). A role is written when it is set, or as null when
    the token that would be its default (`<bos>` ...) exists, so that reading back cannot take that one;
    the rest only when they differ from the defaults, which keeps the files of earlier runs unchanged."""
    cfg: dict = {}
    for role in ROLES:
        i = getattr(tok, f"{role}_id")
        if i is not None or f"<{role}>" in tok.special_tokens:
            cfg[f"{role}_token"] = None if i is None else tok.token_name(i)
    if tok.add_bos:
        cfg["add_bos_token"] = True
    if tok.eos_list is not None:
        cfg[EOS_LIST_KEY] = list(tok.eos_list)
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template
    return cfg


def token_name(value, key: str, where: str) -> str | None:
    """A token as tokenizer_config.json or special_tokens_map.json names it: its text, or an AddedToken
    object holding it under "content"."""
    if isinstance(value, dict) and "content" in value:
        value = value["content"]
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: {key} = {value!r} is not a token's text")


def chat_template_value(value, where: str) -> str | None:
    """A chat template as tokenizer_config.json holds it: text, or a list of named templates (the one
    named "default" is the chat template)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: chat_template is not text")


def settings_from_config(cfg: Mapping, where: str) -> dict:
    """`Tokenizer.with_roles` keyword arguments from the keys of a tokenizer_config.json that are present;
    token names stay names, for `with_roles` to look up."""
    out: dict = {}
    for role in ROLES:
        if f"{role}_token" in cfg:
            out[role] = token_name(cfg[f"{role}_token"], f"{role}_token", where)
    if "add_bos_token" in cfg:
        if not isinstance(cfg["add_bos_token"], bool):
            raise UserError(f"{where}: add_bos_token = {cfg['add_bos_token']!r} is not true or false")
        out["add_bos"] = cfg["add_bos_token"]
    if EOS_LIST_KEY in cfg:
        ids = cfg[EOS_LIST_KEY]
        if ids is not None and not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise UserError(f"{where}: {EOS_LIST_KEY} = {ids!r} is not a list of token ids")
        out["eos_list"] = ids
    if "chat_template" in cfg:
        out["chat_template"] = chat_template_value(cfg["chat_template"], where)
    return out


# ----------------------------------------------------------------------------- import
def _pre_tokenizer_problem(pre) -> str | None:
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        kind = pre.get("type") if isinstance(pre, dict) else pre
        return f"its pre-tokenizer is {kind!r}, not ByteLevel (GPT-2's pattern); scratchlm cannot reproduce it"
    if not pre.get("use_regex", True):
        return "its ByteLevel pre-tokenizer does not split with GPT-2's pattern (use_regex is false)"
    if pre.get("add_prefix_space", False):
        return "its ByteLevel pre-tokenizer adds a space before the text (add_prefix_space), which scratchlm does not"
    return None


def from_hf_dict(doc: Mapping, source: str) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], dict[str, int], bool]:
    """(vocab, merges, special tokens, uncased) of a Hugging Face byte-level BPE `tokenizer.json` document,
    for `Tokenizer` to build from. Added tokens become special tokens; the ids are those of
    `encode(text, add_special_tokens=False)` in `tokenizers`."""

    def refuse(why: str):
        return UserError(f"{source}: cannot read this tokenizer.json: {why}")

    model = doc.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise refuse(f"its model is {kind!r}, not byte-level 'BPE'")
    for key, what in (("dropout", "BPE dropout"), ("continuing_subword_prefix", "a continuing-subword prefix"),
                      ("end_of_word_suffix", "an end-of-word suffix"), ("byte_fallback", "byte fallback"),
                      ("ignore_merges", "ignore_merges (whole words looked up before merging)")):
        if model.get(key):
            raise refuse(f"it uses {what}, which scratchlm's BPE does not")
    if problem := _pre_tokenizer_problem(doc.get("pre_tokenizer")):
        raise refuse(problem)
    norm = doc.get("normalizer")
    uncased = norm is not None
    if uncased and not _is_uncased_normalizer(norm):
        raise refuse(f"its normalizer ({norm.get('type') if isinstance(norm, dict) else norm!r}) is not one "
                     "scratchlm has (none, or scratchlm's uncased sequence)")

    by_id: dict[int, bytes] = {}
    specials: dict[str, int] = {}
    for t in doc.get("added_tokens") or []:
        if t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
            raise refuse(f"added token {t.get('content')!r} uses single_word/lstrip/rstrip matching")
        if uncased and t.get("normalized"):
            raise refuse(f"added token {t.get('content')!r} is matched after normalization")
        specials[t["content"]] = int(t["id"])
        by_id[int(t["id"])] = t["content"].encode("utf-8")
    for token, i in (model.get("vocab") or {}).items():
        if int(i) in by_id:
            continue  # an added token, kept as its text
        data = unspell(token)
        if data is None:
            raise refuse(f"vocabulary token {i} ({token!r}) is not spelled in the byte-level alphabet")
        by_id[int(i)] = data
    if sorted(by_id) != list(range(len(by_id))):
        raise refuse(f"its token ids are not 0..{len(by_id) - 1} without gaps")
    merges = []
    for m in model.get("merges") or []:
        if (pair := unspell_merge(m)) is None:
            raise refuse(f"merge {m!r} is not a pair of byte-level tokens")
        merges.append(pair)
    return by_id, merges, specials, uncased
