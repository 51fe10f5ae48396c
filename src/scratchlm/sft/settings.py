"""From the `[sft]` config to what the SFT data and the training loop take: the persona, the list of
sources with the persona in it, and a number of epochs as a number of optimizer steps."""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from scratchlm.config import SFTConfig, TrainConfig
from scratchlm.errors import UserError
from scratchlm.sft.data import SFTBatches, SFTSource, parse_source
from scratchlm.sft.persona import Persona

PERSONA_KEYS = ("name", "about", "creator", "extra")


def _persona_file(path: Path) -> Persona:
    if not path.is_file():
        raise UserError(f"sft.persona: {path} is neither on, off nor a file")
    try:
        if path.suffix.lower() == ".toml":
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix.lower() == ".json":
            table = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise UserError(f"{path}: a persona file must be .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(table, dict):
        raise UserError(f"{path}: expected a table with {', '.join(PERSONA_KEYS)}")
    unknown = sorted(set(table) - set(PERSONA_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown persona key {unknown[0]!r}; allowed: {', '.join(PERSONA_KEYS)}")
    for key in ("name", "about", "creator"):
        if key in table and not (isinstance(table[key], str) and table[key].strip()):
            raise UserError(f"{path}: persona {key!r} must be non-empty text")
    extra = []
    for i, pair in enumerate(table.get("extra", [])):
        if isinstance(pair, dict) and set(pair) == {"question", "answer"}:
            pair = (pair["question"], pair["answer"])
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
            raise UserError(f"{path}: extra[{i}] must be [question, answer] or {{question, answer}}")
        extra.append(tuple(pair))
    return Persona(**{k: table[k] for k in ("name", "about", "creator") if k in table}, extra=extra)


def load_persona(sft: SFTConfig) -> Persona | None:
    """None when the persona is off; else from the file named, or from the persona_* keys."""
    choice = sft.persona.strip()
    if choice.lower() in ("off", "no", "false", ""):
        return None
    if choice.lower() in ("on", "yes", "true"):
        given = {"name": sft.persona_name, "about": sft.persona_about, "creator": sft.persona_creator}
        return Persona(**{k: v for k, v in given.items() if v})
    return _persona_file(Path(choice).expanduser())


def mixture(sft: SFTConfig, persona: Persona | None) -> list[SFTSource]:
    """The sources to train on. A persona that is on joins them at `persona_weight` unless they already
    name it (their weight then wins); naming it while it is off is a contradiction worth a message."""
    sources = [parse_source(s) for s in sft.sources]
    named = any(s.source == "persona" for s in sources)
    if named and persona is None:
        raise UserError("sft.sources names persona but sft.persona is off; set sft.persona=on (or a file)")
    if persona is not None and not named:
        sources.append(SFTSource("persona", sft.persona_weight))
    return sources


def rows_per_epoch(batches: SFTBatches) -> int:
    """Rows one pass over the shuffled examples fills, packing as the batches do: whole examples while
    they fit context + 1 tokens."""
    if not batches.pack:
        return len(batches.order)
    rows, used = 0, 0
    for i in batches.order:
        n = len(batches.examples[i])
        if rows and used + n <= batches.context + 1:
            used += n
        else:
            rows, used = rows + 1, n
    return rows


def steps_for_epochs(epochs: float, batches: SFTBatches, train: TrainConfig, world: int = 1) -> int:
    """Optimizer steps for `epochs` passes, each step learning from the rows the loop gives it."""
    return max(1, math.ceil(epochs * rows_per_epoch(batches) / train.rows_per_step(batches.context, world)))
