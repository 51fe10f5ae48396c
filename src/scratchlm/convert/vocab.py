"""Tokenizers across formats. GGUF's "gpt2" tokenizer and Hugging Face's byte-level BPE both spell each
token's bytes with GPT-2's printable byte alphabet (`bytes_to_unicode`), and list merges as "a b" with
both halves spelled the same way. Special tokens are the exception: they are stored as their plain text.

What a model says about its special tokens travels with the tokenizer (`Tokenizer.with_roles`): which
are bos, eos, pad and unk, whether bos goes in front, the end ids generation stops at, and the chat
template. GGUF keeps them in `tokenizer.ggml.*_token_id`, `tokenizer.ggml.add_bos_token` and
`tokenizer.chat_template`; a Hugging Face folder spreads them over tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, generation_config.json and config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.files import read_json_object
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.gpt2 import spell, unspell, unspell_merge
from scratchlm.tokenizer.hf import EOS_LIST_KEY, ROLES, leading_token, settings_from_config, token_name

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


def _gguf_tokens(fields: dict) -> tuple[list[str], list[int]]:
    """(tokens, token types) of a GGUF vocabulary, without the unused entries at its end: padding that
    only rounds the embedding table up belongs to the model, not the tokenizer."""
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    while tokens and types[-1] == UNUSED:
        tokens.pop()
        types.pop()
    return tokens, types


def tokenizer_from_gguf(fields: dict, source: str) -> tuple[Tokenizer | None, str]:
    """(tokenizer, note) from a GGUF file's `tokenizer.ggml.*` metadata, read as plain Python values.
    The special-token roles and chat template are read apart, by `gguf_settings`."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        return None, f"tokenizer not imported: GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')"
    tokens, types = _gguf_tokens(fields)
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


# ----------------------------------------------------------------------------- special tokens, chat template
GGUF_ROLES = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
              "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
NO_TEMPLATE_HINT = "fix it, or pass --no-chat-template to convert without it"


def check_token_id(value, key: str, n: int, where) -> int:
    """`value` as a token id below `n`, or a UserError naming `key` in `where`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: {key} = {value!r} is not a token id")
    if not 0 <= value < n:
        raise UserError(f"{where}: {key} = {value} is outside the vocabulary of {n} tokens")
    return value


def check_chat_template(text, key: str, where) -> str:
    """`text` when it parses as a Jinja template (in the sandbox transformers renders templates with),
    else a UserError naming `key` in `where`."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(text, str):
        raise UserError(f"{where}: {key} is not text; {NO_TEMPLATE_HINT}")
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: {key} does not parse as Jinja (line {e.lineno}: {e.message}); "
                        f"{NO_TEMPLATE_HINT}") from None
    return text


def _with_role(tok: Tokenizer, role: str, token, key: str, where) -> Tokenizer:
    try:
        return tok.with_roles(**{role: token})
    except ValueError:
        raise UserError(f"{where}: {key} = {token!r} is not a token of the vocabulary") from None


def _vocab_limit(tok: Tokenizer, model_vocab: int) -> int:
    # Single bytes the source lacked sit past the model's embeddings (see build_tokenizer): never a role.
    return min(tok.vocab_size, model_vocab)


def gguf_settings(fields: dict, tok: Tokenizer, model_vocab: int, source: str,
                  chat_template: bool = True) -> Tokenizer:
    """`tok` with the special-token roles, add_bos and chat template of a GGUF file's metadata; a role the
    file does not name is none. Without `chat_template` the template is left out unread."""
    n = min(_vocab_limit(tok, model_vocab), len(_gguf_tokens(fields)[0]))
    for role, key in GGUF_ROLES.items():
        value = fields.get(key)
        tok = _with_role(tok, role, None if value is None else check_token_id(value, key, n, source), key, source)
    add_bos = fields.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise UserError(f"{source}: tokenizer.ggml.add_bos_token = {add_bos!r} is not true or false")
    template = fields.get("tokenizer.chat_template") if chat_template else None
    if template is not None:
        check_chat_template(template, "tokenizer.chat_template", source)
    return tok.with_roles(add_bos=add_bos, chat_template=template)


def _json_object(path: Path) -> dict:
    return read_json_object(path) or {}


def hf_settings(src: Path, tok: Tokenizer, model_vocab: int, chat_template: bool = True) -> Tokenizer:
    """`tok` with the special-token roles, add_bos, end ids and chat template of a Hugging Face folder.

    Roles are the token names transformers' tokenizer reads (tokenizer_config.json, then
    special_tokens_map.json); the ids of generation_config.json, then config.json, give eos when no name
    does, and their list of end ids (generation stops at any) is kept as `eos_list`. A role that nothing
    names keeps the tokenizer's default. chat_template.jinja wins over tokenizer_config.json's
    template, as in transformers. Without `chat_template` the template is left out unread."""
    src = Path(src)
    n = _vocab_limit(tok, model_vocab)
    config_path = src / "tokenizer_config.json"
    raw = _json_object(config_path)
    if not chat_template:
        raw.pop("chat_template", None)
    config = settings_from_config(raw, str(config_path))
    roles = {r: (config_path, f"{r}_token", config[r]) for r in ROLES if r in config}
    map_path = src / "special_tokens_map.json"
    for key, value in _json_object(map_path).items():
        role = key.removesuffix("_token")
        if role in ROLES and role not in roles:
            roles[role] = (map_path, key, token_name(value, key, str(map_path)))
    eos_list = config.get("eos_list")
    listed = "eos_list" in config
    for path in (src / "generation_config.json", src / "config.json"):
        doc = _json_object(path)
        for role in ("bos", "eos", "pad"):
            key, value = f"{role}_token_id", doc.get(f"{role}_token_id")
            if role == "eos" and isinstance(value, list):
                ids = [check_token_id(v, key, n, path) for v in value]
                if not listed:
                    eos_list, listed = ids, True
                value = ids[0] if ids else None
            if value is not None:
                value = check_token_id(value, key, n, path)
                # Only eos is taken from here: the bos and pad ids of a config are often its class's
                # defaults, which the tokenizer transformers loads does not use.
                if role == "eos":
                    roles.setdefault(role, (path, key, value))
    for role, (path, key, token) in roles.items():
        if isinstance(token, int):
            check_token_id(token, key, n, path)
        tok = _with_role(tok, role, token, key, path)
    tok = _with_role(tok, "eos_list", eos_list, EOS_LIST_KEY, config_path)
    add_bos = config.get("add_bos", False)
    # transformers takes a post-processor's leading token over add_bos_token; so does this.
    first = leading_token(_json_object(src / "tokenizer.json"))
    if first is not None:
        tok, add_bos = _with_role(tok, "bos", first, "post_processor", src / "tokenizer.json"), True
    tok = tok.with_roles(add_bos=add_bos)
    template, where = config.get("chat_template"), config_path
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        try:
            template, where = jinja.read_text(encoding="utf-8"), jinja
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{jinja} cannot be read: {e}") from None
    if not chat_template:
        return tok
    if template is not None:
        check_chat_template(template, "chat_template", where)
    return tok.with_roles(chat_template=template)
