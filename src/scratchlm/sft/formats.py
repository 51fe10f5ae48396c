"""Fine-tuning records in the shapes people already have, read and checked, and turned into chats.

| format        | fields                                         | becomes                                   |
|---------------|------------------------------------------------|-------------------------------------------|
| `qa`          | `question`, `answer` (+ `id`, `category`)      | user: question / assistant: answer        |
| `messages`    | `messages`: [{"role", "content"}, ...]         | the messages as they are                  |
| `instruction` | `instruction`, `output` (+ `input`)            | user: instruction, blank line, input      |
| `flan`        | `inputs`, `targets` (FLAN collections)         | user: inputs / assistant: targets         |
| `summary`     | `dialogue`, `summary` (SAMSum, DialogSum)      | user: "Summarize..." + dialogue / summary |

Files are JSON Lines (one record per line) or JSON (one record, or a list of them). The format is found
from the first record's fields unless given, and every record is checked against it; a bad record
raises UserError naming the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from scratchlm.chat.template import check_messages
from scratchlm.errors import UserError

SUMMARY_PROMPT = "Summarize this dialogue:"

# format -> (required text fields, optional text fields)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "qa": (("question", "answer"), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "flan": (("inputs", "targets"), ()),
    "summary": (("dialogue", "summary"), ()),
}
FORMATS = tuple(FIELDS)


@dataclass
class Record:
    """One record and where it came from, for error messages: `where` is e.g. "qa.jsonl, line 7"."""
    data: Mapping
    where: str


def detect_format(record: Mapping, where: str) -> str:
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, (required, _) in FIELDS.items():
        if all(f in record for f in required):
            return name
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise UserError(f"{where}: cannot tell the format from the fields ({keys}); expected one of: "
                    + "; ".join(f"{n} ({', '.join(r)})" for n, (r, _) in FIELDS.items()))


def _text(record: Mapping, field: str, where: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise UserError(f"{where}: field '{field}' is missing")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be text, not {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field '{field}' is empty")
    return value


def _messages(record: Mapping, where: str) -> list[dict[str, str]]:
    out = check_messages(record.get("messages"), where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise UserError(f"{where}: field 'messages' has no assistant message with text, so nothing to learn")
    return out


def to_chat(record: Mapping, fmt: str, where: str) -> list[dict[str, str]]:
    """The conversation a record stands for, or UserError naming the field at fault."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        return _messages(record, where)
    if fmt == "qa":
        q, a = _text(record, "question", where), _text(record, "answer", where)
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if fmt == "instruction":
        instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output", where)}]
    if fmt == "flan":
        return [{"role": "user", "content": _text(record, "inputs", where)},
                {"role": "assistant", "content": _text(record, "targets", where)}]
    if fmt == "summary":
        dialogue = _text(record, "dialogue", where)
        return [{"role": "user", "content": f"{SUMMARY_PROMPT}\n\n{dialogue}"},
                {"role": "assistant", "content": _text(record, "summary", where)}]
    raise UserError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _json_records(path: Path, text: str) -> Iterator[Record]:
    """The records of a JSON file holding one object or a list of them, each with its line number."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def parse(i: int):
        try:
            return decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None

    i = skip(0)
    if i == len(text):
        raise UserError(f"{path} is empty")
    if text[i] != "[":
        obj, end = parse(i)
        if skip(end) != len(text):
            raise UserError(f"{path}, line {_line_of(text, skip(end))}: more than one JSON value; "
                            "use a list, or JSON Lines (.jsonl) with one record per line")
        yield Record(obj, f"{path}, line {_line_of(text, i)}")
        return
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        obj, end = parse(i)
        yield Record(obj, f"{path}, line {_line_of(text, i)}")
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise UserError(f"{path}, line {_line_of(text, skip(i + 1))}: text after the closing ']'")
            return
        else:
            raise UserError(f"{path}, line {_line_of(text, i)}: expected ',' or ']' between records")


def _jsonl_records(path: Path, text: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        yield Record(obj, f"{path}, line {lineno}")


def read_file(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it first") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = list(_jsonl_records(path, text))
    elif suffix == ".json":
        records = list(_json_records(path, text))
    else:
        raise UserError(f"{path}: SFT data must be .json or .jsonl, not '{path.suffix}'")
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def chats(records: Iterable[Record], fmt: str = "auto", rename: Mapping[str, str] | None = None) -> list[list[dict]]:
    """Conversations from records, all checked against one format (`auto`: the first record's).
    `rename` maps a source's field names to ours, e.g. {"prompt": "question", "response": "answer"}."""
    out, records = [], list(records)
    if fmt != "auto" and fmt not in FIELDS:
        raise UserError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")
    for rec in records:
        data = rec.data
        if rename and isinstance(data, Mapping):
            data = {rename.get(k, k): v for k, v in data.items()}
        if fmt == "auto":
            fmt = detect_format(data, rec.where)
        out.append(to_chat(data, fmt, rec.where))
    return out
