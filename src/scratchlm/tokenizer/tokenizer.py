"""The byte-level BPE `Tokenizer`: encode and decode text with a vocabulary and ordered merges.

Encoding splits out special tokens, pre-tokenizes the rest with the GPT-2 pattern and applies the
merges inside each pre-token. Two encoders do this: `encode_reference`, a plain Python loop that
applies merges by rank, and `encode`, which hands the same ranks to `tiktoken` (Rust) for speed.
`save` writes Hugging Face's `tokenizer.json` format (`tokenizer/hf.py`); `load` reads it, any byte-level
BPE file of that format, and scratchlm's earlier hex format.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_text, read_json_object
from scratchlm.tokenizer.gpt2 import spell, unspell
from scratchlm.tokenizer.hf import (
    ROLES, from_hf_dict, leading_token, settings_config, settings_from_config, to_hf_dict, tokenizer_config,
)
from scratchlm.tokenizer.normalize import normalize_uncased
from scratchlm.tokenizer.pretokenize import (
    GPT2_SPLIT_PATTERN, PRETOKEN_RE, check_special_tokens, find_cut, special_regex, split_specials,
)

FORMAT = "scratchlm-bpe"
FILENAME = "tokenizer.json"
_KEEP = object()  # with_roles: leave this setting as it is

class Tokenizer:
    """Byte-level BPE tokenizer.

    `vocab` maps ids 0..n-1 to bytes; `merges` is the ordered list of merged pairs. `special_tokens` is a
    list of strings (found in `vocab` by their UTF-8 bytes, appended if absent), a dict str -> id, or
    None: then the vocab entries of several bytes that no merge makes are the special tokens.
    Special tokens in the text are always encoded as their ids; where two overlap, the longest wins.

    Beside the vocabulary a tokenizer carries what a model needs to know about its special tokens: which
    one is bos, eos, pad and unk (`<bos>` ... by default, when present), whether a bos goes in front of a
    prompt (`add_bos`), the end ids a model's generation config lists (`eos_list`) and its chat template.
    `with_roles` sets them; `save` and `load` keep them in tokenizer_config.json under Hugging Face's keys.
    """

    def __init__(self, vocab: Mapping[int, bytes], merges: Iterable[tuple[bytes, bytes]],
                 special_tokens: Iterable[str] | Mapping[str, int] | None = None, uncased: bool = False):
        if sorted(vocab) != list(range(len(vocab))):
            raise ValueError("vocab ids must be exactly 0..len(vocab)-1")
        self._vocab = [bytes(vocab[i]) for i in range(len(vocab))]
        self._merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.uncased = bool(uncased)
        self._specials = self._place_specials(special_tokens)
        special_ids = set(self._specials.values())
        self._encoder: dict[bytes, int] = {}
        for i, b in enumerate(self._vocab):
            if i not in special_ids:
                self._encoder.setdefault(b, i)
        missing = [x for x in range(256) if bytes([x]) not in self._encoder]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} of the 256 single bytes (first: {missing[0]})")
        self._ranks: dict[tuple[bytes, bytes], int] = {}
        for r, (a, b) in enumerate(self._merges):
            if a not in self._encoder or b not in self._encoder or a + b not in self._encoder:
                raise ValueError(f"merge {r} ({a!r}, {b!r}) uses or makes a token missing from vocab")
            self._ranks.setdefault((a, b), r)
        self._special_re = special_regex(self._specials)
        self._cache: dict[str, list[int]] = {}
        self._tt = None
        self._roles: dict[str, int | None] = {r: self._specials.get(f"<{r}>") for r in ROLES}
        self.add_bos = False
        self.eos_list: tuple[int, ...] | None = None
        self.chat_template: str | None = None

    def _place_specials(self, special_tokens) -> dict[str, int]:
        if special_tokens is None:
            # Entries of several bytes that no merge makes can only be special tokens (as in train_bpe's
            # output and GPT-2's files), so `Tokenizer(vocab, merges)` finds them by itself.
            merged = {a + b for a, b in self._merges}
            special_tokens = {}
            for i, b in enumerate(self._vocab):
                if len(b) > 1 and b not in merged:
                    try:
                        special_tokens.setdefault(b.decode("utf-8"), i)
                    except UnicodeDecodeError:
                        pass
        if isinstance(special_tokens, Mapping):
            for s, i in special_tokens.items():
                if not 0 <= i < len(self._vocab) or self._vocab[i] != s.encode("utf-8"):
                    raise ValueError(f"special token {s!r} is not vocab entry {i}")
            return dict(special_tokens)
        merged = {a + b for a, b in self._merges}
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self._vocab):
            by_bytes.setdefault(b, []).append(i)
        out = {}
        for s in check_special_tokens(special_tokens or ()):
            sb = s.encode("utf-8")
            ids = by_bytes.get(sb, [])
            # A special whose bytes are also an ordinary token (a single byte or a merge result) needs an
            # entry of its own; trained vocabs list specials first, so the lowest id is the special one.
            if len(ids) > (1 if (len(sb) == 1 or sb in merged) else 0):
                out[s] = ids[0]
            else:
                out[s] = len(self._vocab)
                self._vocab.append(sb)
        return out

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (fast path; identical to `encode_reference`)."""
        return self._encode(text, fast=True)

    def encode_array(self, text: str, dtype=np.uint32) -> np.ndarray:
        """`encode` as a numpy array. On the fast path the ids come out of tiktoken as a buffer and never
        become Python ints, which spares about a tenth of the time of encoding a corpus into shards."""
        tt = self._tiktoken()
        if tt is None:
            return np.asarray(self.encode(text), dtype=dtype)
        out = []
        for k, part in enumerate(split_specials(text, self._special_re)):
            if k % 2:
                out.append(np.array([self._specials[part]], dtype=dtype))
            elif part:
                part = normalize_uncased(part) if self.uncased else part
                try:
                    ids = tt.encode_to_numpy(part, allowed_special=set(), disallowed_special=())
                except UnicodeEncodeError:  # lone surrogates, read as U+FFFD as `encode` does
                    part = part.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                    ids = tt.encode_to_numpy(part, allowed_special=set(), disallowed_special=())
                out.append(ids.astype(dtype, copy=False))
        return out[0] if len(out) == 1 else np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def encode_reference(self, text: str) -> list[int]:
        """Token ids of `text` computed in plain Python: slow, but easy to read and check."""
        return self._encode(text, fast=False)

    def _encode(self, text: str, fast: bool) -> list[int]:
        plain = self._tiktoken().encode_ordinary if fast and self._tiktoken() else self._encode_plain
        out: list[int] = []
        for k, part in enumerate(split_specials(text, self._special_re)):
            if k % 2:
                out.append(self._specials[part])
            elif part:
                out.extend(plain(normalize_uncased(part) if self.uncased else part))
        return out

    def _encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        if len(cache) > 200_000:
            cache.clear()
        for piece in PRETOKEN_RE.findall(text):
            ids = cache.get(piece)
            if ids is None:
                try:
                    data = piece.encode("utf-8")
                except UnicodeEncodeError:
                    # Lone surrogates cannot be encoded; like tiktoken, read them as U+FFFD.
                    return self._encode_plain(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
                ids = cache[piece] = self._bpe(data)
            out.extend(ids)
        return out

    def _bpe(self, data: bytes) -> list[int]:
        """Apply merges to one pre-token: repeatedly merge every occurrence of the lowest-ranked pair."""
        parts = [data[i:i + 1] for i in range(len(data))]
        while len(parts) > 1:
            rank = min(self._ranks.get(pair, len(self._ranks)) for pair in zip(parts, parts[1:]))
            if rank == len(self._ranks):
                break
            a, b = self._merges[rank]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self._encoder[p] for p in parts]

    def _tiktoken(self):
        """A `tiktoken.Encoding` over our ranks, or None when it could encode differently from `_bpe`."""
        if self._tt is None:
            self._tt = False
            if self._tiktoken_equivalent():
                import tiktoken

                self._tt = tiktoken.Encoding(
                    "scratchlm", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=dict(self._encoder),
                    special_tokens=dict(self._specials))
        return self._tt or None

    def _tiktoken_equivalent(self) -> bool:
        """Whether tiktoken's rule gives the same tokens as merging by rank (`_bpe`).

        tiktoken repeatedly merges the adjacent pair whose concatenation is the token with the lowest id.
        That matches `_bpe` when (1) each multi-byte token is made by exactly one merge, (2) ids grow with
        merge order, after the ids of the merged parts, and (3) every token is reachable: `_bpe` of its own
        bytes gives back just that token. Then two adjacent tokens that concatenate to a token are always
        that token's merge, so both rules pick the same pair. Trained vocabularies satisfy all three.
        """
        results = [a + b for a, b in self._merges]
        ids = [self._encoder[r] for r in results]
        return (len(self._encoder) == len(self._vocab) - len(self._specials)
                and len(set(results)) == len(results) == sum(len(b) > 1 for b in self._encoder)
                and all(x < y for x, y in zip(ids, ids[1:]))
                and all(self._encoder[a] < i and self._encoder[b] < i for (a, b), i in zip(self._merges, ids))
                and self._all_reachable())

    def _all_reachable(self) -> bool:
        """Condition (3) without running `_bpe` on every token (which takes seconds on 50k tokens).

        `_bpe` on the bytes of t = a + b (merge r) runs as on a and on b side by side, unless some merge
        before r joins the last token of a's run to the first token of b's run. So it suffices to keep,
        per token, the history of its run's right and left edges as (merge index, token id) steps, and
        to look for such a crossing merge while both histories are current. Checked against brute force
        in the tests.
        """
        enc = self._encoder
        pairs = [(enc[a], enc[b]) for a, b in self._merges]
        rank = {p: r for r, p in enumerate(pairs)}
        inf = len(pairs)
        # Histories are linked lists, newest step first: (merge index, token id, older steps or None).
        left = {enc[bytes([x])]: (-1, enc[bytes([x])], None) for x in range(256)}
        right = dict(left)
        for r, (a, b) in enumerate(pairs):
            cx, cy, nx, ny = right[a], left[b], inf, inf
            while cx and cy:  # walk back through every (x, y) that face each other at some time
                (tx, x, older_x), (ty, y, older_y) = cx, cy
                q = rank.get((x, y), inf)
                # Merge q crosses if x and y are both there when it runs; if x itself is merged at q, that
                # happens first (merges go left to right), while y merged at q loses to the crossing.
                if q < r and tx < q < nx and ty < q <= ny:
                    return False
                if tx >= ty:
                    cx, nx = older_x, tx
                if ty >= tx:
                    cy, ny = older_y, ty
            made = enc[self._merges[r][0] + self._merges[r][1]]
            right[made] = (r, made, right[b])
            left[made] = (r, made, left[a])
        return True

    def encode_iterable(self, iterable: Iterable[str], buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open file) as if it were one text.

        Text is buffered until at least `buffer_chars` are pending, then encoded up to the last place where
        a cut cannot change the result (see `pretokenize.find_cut`); memory stays bounded unless the input
        has no such place, like one giant word.
        """
        for ids in self.encode_chunks(iterable, buffer_chars):
            yield from ids

    def encode_chunks(self, iterable: Iterable[str], buffer_chars: int = 1 << 20) -> Iterator[list[int]]:
        """Like `encode_iterable`, but yields the ids in lists, one per encoded stretch of text."""
        pending: list[str] = []
        size, target = 0, buffer_chars
        for piece in iterable:
            pending.append(piece)
            size += len(piece)
            if size < target:
                continue
            buf = "".join(pending)
            cut = find_cut(buf, self._specials)
            if cut == 0:
                pending, target = [buf], 2 * size  # doubling keeps re-scans of a cut-less buffer linear
                continue
            yield self.encode(buf[:cut])
            pending, size = [buf[cut:]], len(buf) - cut
            target = size + buffer_chars
        if pending:
            yield self.encode("".join(pending))

    def encode_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        """Encode several texts; in threads on the fast path, where tiktoken releases the GIL."""
        texts = list(texts)
        if self._tiktoken() is None or len(texts) < 2 or num_threads <= 1:
            return [self.encode(t) for t in texts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(self.encode, texts))

    def encode_file(self, path: str | os.PathLike, dtype=None) -> np.ndarray:
        """All token ids of a UTF-8 text file as a numpy array (uint16 when the vocab fits, else uint32)."""
        if dtype is None:
            dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

        def pieces():
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                while piece := f.read(1 << 20):
                    yield piece

        arrays = [np.asarray(ids, dtype=dtype) for ids in self.encode_chunks(pieces(), 1 << 20)]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    # ----------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int], errors: str = "strict") -> bytes:
        """The bytes that `ids` stand for. An id outside the vocabulary raises ValueError, or with
        `errors="replace"` stands for U+FFFD (a model whose output layer is padded can sample one)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids if isinstance(ids, list) else list(ids)
        vocab, n = self._vocab, len(self._vocab)
        try:
            return b"".join([vocab[i] if i >= 0 else vocab[n] for i in ids])
        except (IndexError, TypeError):
            if errors == "replace":
                bad = "\ufffd".encode()
                return b"".join([vocab[i] if isinstance(i, int) and 0 <= i < n else bad for i in ids])
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < n)
            raise ValueError(f"token id {bad!r} is not in this vocabulary of {n}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; never raises: bytes that are not valid UTF-8, and ids outside the vocabulary,
        become U+FFFD."""
        return self.decode_bytes(ids, errors="replace").decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- inspection
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[int, bytes]:
        return dict(enumerate(self._vocab))

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        return list(self._merges)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def token_to_id(self, token: str) -> int:
        """The id of a special token or of the ordinary token with these UTF-8 bytes (KeyError if none)."""
        if token in self._specials:
            return self._specials[token]
        try:
            return self._encoder[token.encode("utf-8")]
        except KeyError:
            raise KeyError(f"{token!r} is not a token of this vocabulary") from None

    def id_to_bytes(self, i: int) -> bytes:
        if not 0 <= i < len(self._vocab):
            raise ValueError(f"token id {i} is not in this vocabulary of {len(self._vocab)}")
        return self._vocab[i]

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 length of each token, 0 for special tokens (they stand for no text): for bits per byte."""
        lengths = [len(b) for b in self._vocab]
        for i in self._specials.values():
            lengths[i] = 0
        return lengths

    bos_id = property(lambda self: self._roles["bos"], doc="id of the beginning-of-sequence token, or None")
    eos_id = property(lambda self: self._roles["eos"], doc="id of the end-of-sequence token, or None")
    pad_id = property(lambda self: self._roles["pad"], doc="id of the padding token, or None")
    unk_id = property(lambda self: self._roles["unk"], doc="id of the unknown token, or None")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: eos, then the other ids of `eos_list`."""
        eos = () if self.eos_id is None else (self.eos_id,)
        return tuple(dict.fromkeys(eos + (self.eos_list or ())))

    def token_name(self, i: int) -> str:
        """A token as Hugging Face's files name it: a special token's text, an ordinary token's bytes
        spelled in GPT-2's byte alphabet."""
        for s, j in self._specials.items():
            if j == i:
                return s
        return spell(self.id_to_bytes(i))

    def _token_id(self, token: int | str, role: str) -> int:
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise ValueError(f"{role} token {token!r} is neither a token id nor a token's name")
        if isinstance(token, int):
            if not 0 <= token < len(self._vocab):
                raise ValueError(f"{role} token id {token} is outside the vocabulary of {len(self._vocab)} tokens")
            return token
        if token in self._specials:
            return self._specials[token]
        data = unspell(token)
        if data is None or data not in self._encoder:
            raise ValueError(f"{role} token {token!r} is not a token of this vocabulary")
        return self._encoder[data]

    def with_roles(self, *, bos=_KEEP, eos=_KEEP, pad=_KEEP, unk=_KEEP, add_bos=_KEEP, eos_list=_KEEP,
                   chat_template=_KEEP) -> Tokenizer:
        """A copy of this tokenizer with the settings given changed. A role token (bos, eos, pad, unk, and
        each of `eos_list`) is an id or a name as `token_name` gives it; None clears a role, and an
        `eos_list` of None says the model names only eos. ValueError for a token the vocabulary lacks."""
        new = copy.copy(self)
        new._roles = dict(self._roles)
        for role, token in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
            if token is not _KEEP:
                new._roles[role] = None if token is None else self._token_id(token, role)
        if add_bos is not _KEEP:
            new.add_bos = bool(add_bos)
        if eos_list is not _KEEP:
            new.eos_list = None if eos_list is None else tuple(self._token_id(t, "eos") for t in eos_list)
        if chat_template is not _KEEP:
            if chat_template is not None and not isinstance(chat_template, str):
                raise ValueError("the chat template is not text")
            new.chat_template = chat_template
        return new

    @property
    def roles(self) -> dict:
        """The settings `with_roles` takes, as this tokenizer has them: `other.with_roles(**tok.roles)`
        gives `other` (a vocabulary that extends this one) the same."""
        return {**self._roles, "add_bos": self.add_bos, "eos_list": self.eos_list, "chat_template": self.chat_template}

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"special_tokens={list(self._specials)}, uncased={self.uncased}, bos={self.bos_id}, eos={self.eos_id})")

    def __getstate__(self):
        # The tiktoken object and the cache are rebuilt on demand, which keeps pickles small and portable.
        return {k: v for k, v in self.__dict__.items() if k not in ("_tt", "_cache")}

    def __setstate__(self, state):
        self.__dict__.update(state, _tt=None, _cache={})

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into `directory`: `tokenizer.json`, `tokenizer_config.json` and a readable
        `vocab.txt`.

        `tokenizer.json` is in Hugging Face's format (see `save_hf`), so the folder also loads with
        `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer`. The rare tokenizer that format
        cannot describe (two ids with the same bytes, a special token spelled like an ordinary one) is
        written in scratchlm's own hex format instead, which `load` reads too.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "tokenizer_config.json"
        try:
            doc, cfg = to_hf_dict(self), tokenizer_config(self)
        except UserError:
            doc, cfg = self._legacy_dict(), None
        atomic_write_text(directory / FILENAME, json.dumps(doc, indent=0, ensure_ascii=False) + "\n")
        if cfg is not None:
            atomic_write_text(config, json.dumps(cfg, indent=2) + "\n")
        elif config.exists():
            config.unlink()  # a stale one would point transformers at a file it cannot read
        specials = set(self._specials.values())
        lines = [f"{i}\t{'special' if i in specials else len(b)}\t{b.decode('utf-8', 'backslashreplace')!r}"
                 for i, b in enumerate(self._vocab)]
        atomic_write_text(directory / "vocab.txt", "id\tbytes\ttoken\n" + "\n".join(lines) + "\n")
        return directory

    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` in Hugging Face's format; `tokenizers` and
        `transformers.PreTrainedTokenizerFast` encode with them exactly as `encode` does. UserError when
        the format cannot describe this tokenizer."""
        directory = Path(directory)
        doc, cfg = to_hf_dict(self), tokenizer_config(self)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / FILENAME, json.dumps(doc, indent=0, ensure_ascii=False) + "\n")
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
        return directory

    def _legacy_dict(self) -> dict:
        # The roles go in the file itself: a tokenizer_config.json beside it would send transformers
        # to a tokenizer.json it cannot read.
        return {
            "format": FORMAT, "version": 1, "pattern": GPT2_SPLIT_PATTERN, "uncased": self.uncased,
            "special_tokens": self._specials,
            "vocab": [b.hex() for b in self._vocab],
            "merges": [f"{a.hex()} {b.hex()}" for a, b in self._merges],
            **settings_config(self),
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer folder (or its `tokenizer.json`): one written by `save`, in either of its
        formats, or a Hugging Face byte-level BPE `tokenizer.json` such as GPT-2's."""
        path = Path(directory)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise UserError(f"no tokenizer at {directory} (expected a folder with {FILENAME}); train one first")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and "model" in doc and "format" not in doc:
                vocab, merges, specials, uncased = from_hf_dict(doc, str(path))
                try:
                    tok = cls(vocab, merges, specials, uncased=uncased)
                except ValueError as e:
                    raise UserError(f"{path}: cannot read this tokenizer.json: {e}") from None
                if (first := leading_token(doc)) is not None:  # transformers adds it: so does bos here
                    tok = tok._apply_settings({"bos_token": first, "add_bos_token": True}, str(path))
                return tok._with_settings(path.with_name("tokenizer_config.json"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r} nor Hugging Face's")
            if doc.get("pattern", GPT2_SPLIT_PATTERN) != GPT2_SPLIT_PATTERN:
                raise ValueError("it uses a pre-tokenization pattern other than GPT-2's")
            vocab = {i: bytes.fromhex(h) for i, h in enumerate(doc["vocab"])}
            merges = [tuple(bytes.fromhex(h) for h in m.split(" ")) for m in doc["merges"]]
            if any(len(m) != 2 for m in merges):
                raise ValueError("a merge is not a pair")
            tok = cls(vocab, merges, dict(doc["special_tokens"]), uncased=bool(doc.get("uncased", False)))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise UserError(f"malformed tokenizer file {path}: {e}") from None
        return tok._apply_settings(doc, str(path))

    def _with_settings(self, config: Path) -> Tokenizer:
        """This tokenizer with the roles and template of `config` (a tokenizer_config.json), if any."""
        cfg = read_json_object(config)
        return self if cfg is None else self._apply_settings(cfg, str(config))

    def _apply_settings(self, cfg: dict, where: str) -> Tokenizer:
        try:
            return self.with_roles(**settings_from_config(cfg, where))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
        """Load GPT-2's `encoder.json`/`vocab.json` and `vocab.bpe`/`merges.txt`; encodes as tiktoken's gpt2."""
        from scratchlm.tokenizer.gpt2 import read_gpt2_files

        vocab, merges, specials = read_gpt2_files(vocab_path, merges_path)
        return cls(vocab, merges, specials)
