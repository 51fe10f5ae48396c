"""The dialogue sets, chatterbot (Q&A pairs) and chitchat (chats): parsed from their PyPI wheels into
conversations that serve twice, as pretraining text (`sources.get_dataset`) and as structured records for
fine-tuning (`load_records`), with one train/val split for both."""
from __future__ import annotations

import itertools
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from scratchlm.errors import UserError
from scratchlm.fetch import cache_dir, pip_fetch

# A dialogue "unit" is one conversation: (its rendering as pretraining text, its structured records).
# Text and records come from the same units, so load_records(split="val") matches val.txt exactly.
Unit = tuple[str, list[dict]]


def chatterbot_units(files: Iterable[tuple[str, str]]) -> list[Unit]:
    """Parse chatterbot YAML given as `(file_stem, yaml_text)` pairs in package order."""
    import yaml

    units: list[Unit] = []
    for stem, text in files:
        # BaseLoader keeps every scalar a string: safe_load would turn a bare `yes` into True, `1.0` into 1.0
        for conv in (yaml.load(text, Loader=yaml.BaseLoader) or {}).get("conversations") or []:
            msgs = [m.strip() for m in conv if isinstance(m, str) and m.strip()]
            if msgs:
                recs = [{"question": q, "answer": a, "category": stem} for q, a in itertools.pairwise(msgs)]
                units.append(("\n".join(msgs) + "\n\n", recs))
    return units


def chitchat_units(data: dict) -> list[Unit]:
    """Parse dataset.json: {chat_id: {"messages": [[{"text", "sender", ...}, ...], ...]}}. Each inner list
    is one turn (one sender's utterances), joined with spaces as the package does, on one line."""
    units: list[Unit] = []
    for chat in data.values():
        turns: list[list[str]] = []  # [sender, text]
        for turn in chat.get("messages") or []:
            text = " ".join(" ".join(str(u.get("text") or "") for u in turn).split())
            if not text:
                continue
            sender = str(turn[0].get("sender"))
            if turns and turns[-1][0] == sender:  # an all-empty turn was dropped: keep roles alternating
                turns[-1][1] += " " + text
            else:
                turns.append([sender, text])
        if turns:
            msgs = [{"role": "user" if s == turns[0][0] else "assistant", "content": t} for s, t in turns]
            units.append(("\n".join(t for _, t in turns) + "\n\n", [{"messages": msgs}]))
    return units


def _chatterbot_from_wheel(whl: Path) -> list[Unit]:
    with zipfile.ZipFile(whl) as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/[^/]+\.yml", n))
        return chatterbot_units((PurePosixPath(n).stem, zf.read(n).decode("utf-8")) for n in names)


def _chitchat_from_wheel(whl: Path) -> list[Unit]:
    with zipfile.ZipFile(whl) as zf:
        return chitchat_units(json.loads(zf.read("chitchat_dataset/dataset.json")))


DIALOGUES: dict[str, tuple[str, Callable[[Path], list[Unit]]]] = {
    "chatterbot": ("chatterbot-corpus==1.3.3", _chatterbot_from_wheel),
    "chitchat": ("chitchat-dataset==0.9.0", _chitchat_from_wheel),
}


def dialogue_units(name: str, root: Path, progress: bool) -> list[Unit]:
    spec, parse = DIALOGUES[name]
    return parse(pip_fetch(spec, root, sdist=False, progress=progress))


VAL_EVERY = 10
# Written beside a dialogue set's split files: a cache made under an older rule is built again.
DIALOGUE_SPLIT = "val: every 10th conversation\n"


def dialogue_val(n: int, label: str) -> set[int]:
    """Every tenth conversation is held out (the last of each ten; of a set under ten, the last one). The
    packages list conversations topic by topic, so a tail cut would hold out one topic (chatterbot's
    trivia) and score a chat model on nothing it was taught to talk about."""
    if n < 2:
        raise UserError(f"{label} has {n} conversation(s); need at least 2 to split into train and val")
    every = min(VAL_EVERY, n)
    return {i for i in range(n) if i % every == every - 1}


def build_dialogues(name: str, train_f: BinaryIO, val_f: BinaryIO, root: Path, progress: bool) -> None:
    units = dialogue_units(name, root, progress)
    val = dialogue_val(len(units), name)
    for i, (text, _) in enumerate(units):
        out = val_f if i in val else train_f
        out.mark_document()
        out.write((text if text.endswith("\n") else text + "\n").encode("utf-8", "replace"))


def load_records(name: str, *, split: str | None = None, cache: str | os.PathLike | None = None,
                 progress: bool = True) -> list[dict]:
    """Structured view of a dialogue set for fine-tuning. chatterbot: {"question", "answer", "category"}
    per consecutive pair in a conversation; chitchat: {"messages": [{"role", "content"}, ...]} per chat.
    `split` ("train"/"val") picks the same conversations as train.txt/val.txt; None gives all."""
    if name not in DIALOGUES:
        raise UserError(f"load_records supports {', '.join(DIALOGUES)}; '{name}' has no structured records")
    if split not in (None, "train", "val"):
        raise UserError(f"split must be 'train', 'val' or None, not {split!r}")

    units = dialogue_units(name, Path(cache).expanduser() if cache else cache_dir(), progress)
    val = dialogue_val(len(units), name)
    chosen = [u for i, u in enumerate(units) if split is None or (i in val) == (split == "val")]
    return [rec for _, recs in chosen for rec in recs]
