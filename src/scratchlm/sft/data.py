"""Supervised fine-tuning data: sources mixed by weight, rendered with the chat template into examples
(token ids and a loss mask), and served as fixed-shape batches whose targets are -100 wherever nothing
is learned (the prompt, the padding), which `F.cross_entropy` skips by default.

    tok, added = add_chat_tokens(tok, model)          # from scratchlm.chat.template
    data = prepare_sft(tok, ["chatterbot", "persona*3", "data/faq.jsonl"], context=256, batch=16, seed=0,
                       persona=Persona(name="Pip"))
    x, y = data.batches.next_batch()      # (16, 256) long tensors; y is -100 where there is no loss
    evaluate = sft_evaluator(data.val, torch.tensor(tok.token_byte_lengths()), context=256)

A weight is how many times each example of a source is seen per epoch, on average: 3 repeats it three
times, 0.5 takes a different random half every epoch. Batches depend only on the seed and the data, and
`state_dict()` / `load_state_dict()` resume them exactly, as the pretraining loader does.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlm.chat.template import render
from scratchlm.errors import UserError
from scratchlm.eval.metrics import IGNORE, evaluate_batches
from scratchlm.fetch import first_line, import_datasets, parse_hf_spec
from scratchlm.sft.formats import Record, chats, read_file
from scratchlm.sft.persona import Persona
from scratchlm.tokenizer import Tokenizer

NAMED = ("chatterbot", "chitchat")
MIN_FOR_VAL = 10        # a source smaller than this gives all its records to training


@dataclass
class SFTSource:
    source: str                        # chatterbot | chitchat | persona | a .json/.jsonl file | hf:NAME[:CONFIG][@SPLIT]
    weight: float = 1.0
    format: str = "auto"               # auto | qa | messages | instruction | flan | summary
    rename: dict[str, str] = field(default_factory=dict)   # source field -> our field
    limit: int = 0                     # only the first N records (0: all)
    system: str = ""                   # a system message put before every conversation of this source


def parse_source(spec: str | Mapping) -> SFTSource:
    """`SOURCE` or `SOURCE*WEIGHT` (e.g. `persona*3`), or a table with SFTSource's fields."""
    if isinstance(spec, Mapping):
        known = set(SFTSource.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown or "source" not in spec:
            raise UserError(f"SFT source {dict(spec)!r}: needs 'source'; allowed keys: {', '.join(sorted(known))}")
        src = SFTSource(**spec)
    elif isinstance(spec, str):
        name, star, weight = spec.rpartition("*")
        if not star:
            name, weight = spec, "1"
        try:
            src = SFTSource(name.strip(), float(weight))
        except ValueError:
            raise UserError(f"SFT source {spec!r}: the weight after '*' must be a number") from None
    else:
        raise UserError(f"SFT source must be text or a table, not {type(spec).__name__}")
    if not isinstance(src.weight, (int, float)) or not math.isfinite(src.weight) or src.weight < 0:
        raise UserError(f"SFT source {src.source!r}: weight must be a number >= 0, not {src.weight!r}")
    if not src.source:
        raise UserError("SFT source with an empty name")
    return src


@dataclass
class SFTSplit:
    name: str
    weight: float
    train: list[list[dict]]        # conversations
    val: list[list[dict]]
    repeats: int = 0               # held-out conversations dropped because training has the same prompt


def _prompt_key(conversation: Sequence[Mapping]) -> tuple:
    """What a conversation asks before its first answer, compared without case or outer white space."""
    head = []
    for m in conversation:
        if m["role"] == "assistant":
            break
        head.append((m["role"], " ".join(m["content"].lower().split())))
    return tuple(head)


def drop_repeated_prompts(splits: Sequence[SFTSplit]) -> None:
    """Take out of every held-out set the conversations whose prompt some training conversation of the
    mixture also has. Datasets repeat themselves (chatterbot asks 144 of its 227 held-out questions again
    in its training files), and a held-out score over repeats measures recall, not answering."""
    seen = {_prompt_key(c) for s in splits for c in s.train}
    for s in splits:
        kept = [c for c in s.val if _prompt_key(c) not in seen]
        s.repeats, s.val = len(s.val) - len(kept), kept


def _held_out(n: int, fraction: float) -> int:
    """Records kept for validation: the last `fraction`, at least one, none from a tiny source."""
    if n < MIN_FOR_VAL or fraction <= 0:
        return 0
    return min(max(1, int(round(n * fraction))), n - 1)


def _hf_records(spec: str) -> list[Record]:
    name, config, split = parse_hf_spec(spec)
    datasets = import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library's failures (network, missing repo, bad config) are the user's to fix
        raise UserError(f"cannot load {spec}: {first_line(e)}") from e
    return [Record(row, f"{spec}, record {i}") for i, row in enumerate(ds)]


def load_source(src: SFTSource, persona: Persona | None = None, val_fraction: float = 0.1,
                cache: str | os.PathLike | None = None, progress: bool = True) -> SFTSplit:
    """One source's conversations, split into train and val (the last records; for the named datasets,
    the same conversations as their pretraining val.txt, so a chat model is never scored on text it
    was pretrained on)."""
    name = src.source
    if name in NAMED:
        from scratchlm.data.dialogues import load_records

        parts = {}
        for split in ("train", "val"):
            records = load_records(name, split=split, cache=cache, progress=progress)
            parts[split] = chats([Record(r, f"{name} ({split}), record {i}") for i, r in enumerate(records)],
                                 src.format, src.rename)
        train, val = parts["train"], parts["val"]
        if src.limit:
            train, val = train[:src.limit], val[:max(1, src.limit // 10)]
    else:
        if name == "persona":
            records = [Record(r, f"persona, pair {i}") for i, r in enumerate((persona or Persona()).records())]
            fraction = 0.0  # the identity answers are few and all of them are to be learned
        elif name.startswith("hf:"):
            records, fraction = _hf_records(name), val_fraction
        elif Path(name).expanduser().exists() or name.endswith((".json", ".jsonl")):
            records, fraction = read_file(Path(name).expanduser()), val_fraction
        else:
            raise UserError(f"unknown SFT source {name!r}: use {', '.join(NAMED)}, persona, a .json/.jsonl file "
                            "or hf:NAME[:CONFIG][@SPLIT]")
        if src.limit:
            records = records[:src.limit]
        convs = chats(records, src.format, src.rename)
        cut = len(convs) - _held_out(len(convs), fraction)
        train, val = convs[:cut], convs[cut:]
    if src.system:
        system = [{"role": "system", "content": src.system}]
        train, val = [system + c for c in train], [system + c for c in val]
    return SFTSplit(name, float(src.weight), train, val)


def load_mixture(sources: Sequence[SFTSource | str | Mapping], persona: Persona | None = None,
                 val_fraction: float = 0.1, cache: str | os.PathLike | None = None,
                 progress: bool = True, drop_repeats: bool = True) -> list[SFTSplit]:
    parsed = [s if isinstance(s, SFTSource) else parse_source(s) for s in sources]
    if not parsed:
        raise UserError("no SFT sources given")
    splits = [load_source(s, persona, val_fraction, cache, progress) for s in parsed]
    if drop_repeats:
        drop_repeated_prompts(splits)
    if not any(s.train and s.weight > 0 for s in splits):
        raise UserError("the SFT mixture has no training examples (all sources empty or weighted 0)")
    return splits


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]       # mask[i]: ids[i] is a target that training learns

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TokenizeStats:
    conversations: int = 0
    examples: int = 0
    split: int = 0          # conversations cut into several examples at user turns
    truncated: int = 0      # examples cut at max_len
    dropped: int = 0        # examples left with nothing to learn


def tokenize_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], max_len: int,
                  stats: TokenizeStats | None = None) -> list[Example]:
    """A conversation as examples of at most `max_len` tokens (context + 1, since inputs and targets
    are the same row shifted by one). A longer conversation is cut before user messages into pieces that
    each start as the conversation does (<bos>, then its system message if it has one); a single
    exchange still too long is truncated, and dropped if no learned token survives."""
    stats = stats if stats is not None else TokenizeStats()
    stats.conversations += 1
    ids, mask = render(tokenizer, messages)
    if len(ids) <= max_len:
        pieces = [Example(ids, mask)]
    else:
        stats.split += 1
        head = render(tokenizer, [], bos=True)
        start = 0
        if messages and messages[0]["role"] == "system":
            s_ids, s_mask = render(tokenizer, messages[:1], bos=False)
            head = (head[0] + s_ids, head[1] + s_mask)
            start = 1
        turns: list[tuple[list[int], list[bool]]] = []
        for m in messages[start:]:
            seg = render(tokenizer, [m], bos=False)
            if m["role"] == "user" or not turns:
                turns.append(([], []))
            turns[-1][0].extend(seg[0])
            turns[-1][1].extend(seg[1])
        pieces, cur = [], None
        for t_ids, t_mask in turns:
            if cur is not None and len(cur.ids) + len(t_ids) <= max_len:
                cur.ids += t_ids
                cur.mask += t_mask
                continue
            cur = Example(head[0] + t_ids, head[1] + t_mask)
            pieces.append(cur)
    out = []
    for ex in pieces:
        if len(ex) > max_len:
            stats.truncated += 1
            ex = Example(ex.ids[:max_len], ex.mask[:max_len])
        if any(ex.mask[1:]):   # the first token is never a target
            out.append(ex)
        else:
            stats.dropped += 1
    stats.examples += len(out)
    return out


def tokenize_chats(tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping]], max_len: int,
                   stats: TokenizeStats | None = None) -> list[Example]:
    stats = stats if stats is not None else TokenizeStats()
    return [ex for conv in conversations for ex in tokenize_chat(tokenizer, conv, max_len, stats)]


def to_row(examples: Sequence[Example], width: int, pad_id: int) -> tuple[list[int], list[int]]:
    """Examples laid end to end and padded to `width` + 1 tokens, as (inputs, targets) of `width`:
    targets are the next tokens where they are learned, IGNORE elsewhere."""
    ids = [t for ex in examples for t in ex.ids]
    mask = [m for ex in examples for m in ex.mask]
    if len(ids) > width + 1:
        raise ValueError(f"{len(ids)} tokens do not fit a row of {width} + 1")
    ids += [pad_id] * (width + 1 - len(ids))
    mask += [False] * (width + 1 - len(mask))
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


class SFTBatches:
    """Endless (inputs, targets) batches of shape (batch, context) from weighted groups of examples.

    Each epoch visits every example `weight` times on average in an order shuffled from (seed, epoch).
    With `pack`, whole examples are laid end to end while they fit a row (no example is ever split, so
    no loss falls across two examples: each starts with a token that is not learned); without it, one
    example per row. Rows are padded with `pad_id`. Under data parallelism every process builds the whole
    global batch and keeps its own slice, as `RandomWindows` does.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[Example], float]], context: int, batch: int, seed: int,
                 pad_id: int = 0, pack: bool = True, device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        self.examples: list[Example] = []
        self.groups: list[tuple[int, int, float]] = []     # (first index, count, weight)
        for examples, weight in groups:
            if weight < 0 or not math.isfinite(weight):
                raise UserError(f"SFT weight must be a number >= 0, not {weight!r}")
            for ex in examples:
                if len(ex) > context + 1:
                    raise ValueError(f"an example of {len(ex)} tokens does not fit context {context} + 1; "
                                     "tokenize with max_len = context + 1")
            self.groups.append((len(self.examples), len(examples), float(weight)))
            self.examples.extend(examples)
        if not any(n and w > 0 for _, n, w in self.groups):
            raise UserError("no SFT examples to train on (every source is empty or weighted 0)")
        self.context, self.batch, self.seed, self.pad_id, self.pack = context, batch, seed, pad_id, pack
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        picks: list[int] = []
        for first, n, weight in self.groups:
            whole, part = int(weight), weight - int(weight)
            picks += list(range(first, first + n)) * whole
            extra = int(round(part * n))
            if extra:
                picks += (first + rng.permutation(n)[:extra]).tolist()
        if not picks:  # weights so small that rounding left nothing: take one of the heaviest group
            first, n, _ = max(self.groups, key=lambda g: g[2] * g[1])
            picks = [first + int(rng.integers(n))]
        return [picks[i] for i in rng.permutation(len(picks))]

    def _peek(self) -> Example:
        if self.cursor >= len(self.order):
            self.epoch += 1
            self.cursor = 0
            self.order = self._order(self.epoch)
        return self.examples[self.order[self.cursor]]

    def _row(self) -> tuple[list[int], list[int]]:
        taken, used = [], 0
        while True:
            ex = self._peek()
            if taken and (not self.pack or used + len(ex) > self.context + 1):
                break
            taken.append(ex)
            used += len(ex)
            self.cursor += 1
        return to_row(taken, self.context, self.pad_id)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row() for _ in range(self.batch * self.world)]
        rows = rows[self.rank * self.batch:(self.rank + 1) * self.batch]
        x = torch.tensor([r[0] for r in rows], dtype=torch.long)
        y = torch.tensor([r[1] for r in rows], dtype=torch.long)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / max(1, len(self.order))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"the SFT data was seeded with {state['seed']}, not {self.seed}; resume with the same seed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = self._order(self.epoch)


@dataclass
class SFTData:
    batches: SFTBatches
    val: list[Example]              # held-out examples, for `sft_evaluator`
    val_chats: list[list[dict]]     # the same, as conversations (for generating answers and scoring them)
    stats: TokenizeStats
    sources: list[tuple[str, float, int, int, int]]   # (name, weight, train examples, val examples, repeats dropped)


def prepare_sft(tokenizer: Tokenizer, sources: Sequence[SFTSource | str | Mapping], *, context: int, batch: int,
                seed: int, persona: Persona | None = None, val_fraction: float = 0.1, pack: bool = True,
                device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                cache: str | os.PathLike | None = None, progress: bool = True, drop_repeats: bool = True) -> SFTData:
    """Everything `scratchlm sft` needs from its data settings: load and split the mixture, render it
    with the chat template (the tokenizer must have the chat tokens: `add_chat_tokens`) and batch it."""
    splits = load_mixture(sources, persona, val_fraction, cache, progress, drop_repeats)
    stats, groups, val, val_chats, summary = TokenizeStats(), [], [], [], []
    for s in splits:
        train = tokenize_chats(tokenizer, s.train, context + 1, stats)
        held = tokenize_chats(tokenizer, s.val, context + 1, stats)
        groups.append((train, s.weight))
        val += held
        val_chats += s.val
        summary.append((s.name, s.weight, len(train), len(held), s.repeats))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batches = SFTBatches(groups, context, batch, seed, pad, pack, device, rank, world)
    return SFTData(batches, val, val_chats, stats, summary)


def sft_evaluator(examples: Sequence[Example], token_bytes: torch.Tensor, context: int, batch: int = 16,
                  pad_id: int = 0, device: torch.device | str = "cpu",
                  autocast: Callable | None = None) -> Callable[[torch.nn.Module, int], dict]:
    """`evaluate(model, max_tokens)` for the training loop: loss, perplexity and bits per byte on the
    learned tokens of held-out examples only (the answers), one example per row, in order."""
    rows = [to_row([ex], context, pad_id) for ex in examples]

    def batches():
        for i in range(0, len(rows), batch):
            group = rows[i:i + batch]
            yield torch.tensor([x for x, _ in group]), torch.tensor([y for _, y in group])

    def run(model: torch.nn.Module, max_tokens: int = 0) -> dict:
        return evaluate_batches(model, batches(), token_bytes, max_tokens=max_tokens, device=device, autocast=autocast)

    return run
