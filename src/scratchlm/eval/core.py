"""CORE, the DCLM paper's summary score (the one nanochat reports): accuracy on each task, centred on
chance as (accuracy - chance) / (1 - chance), averaged over the tasks.

CORE's tasks come in three kinds, one record each:

    multiple choice   {"query", "choices", "gold"}                the choice after the query
    schema            {"context_options", "continuation", "gold"} the context before the continuation
    language model    {"context", "continuation"}                 greedy decoding writes the continuation

and its prompts are the shots, each a context, the delimiter and its answer followed by a blank line,
then the question's context and the delimiter. A multiple-choice or schema pick is the option with the
highest mean log-probability per continuation token. (nanochat counts the tokens after the choices'
common prefix; here a choice's tokens are what follows the prompt's own tokens, as in lm-evaluation-harness.)

Suites:
    core6   the six BIG-bench tasks of CORE, made from BIG-bench's own task files, offline: qa_wikidata,
            dyck_languages, operators, cs_algorithms and repeat_copy_logic as language modelling, and
            language_identification as multiple choice, 10 shots each, delimiter " ". Each example is
            written in its task's BIG-bench layout (input and output prefixes) without the task's
            instructions or a list of the choices; the continuation is its first target or best-graded
            choice.
    core    all 22 tasks from the DCLM eval bundle nanochat uses (needs the internet once), with the
            shots, delimiters and chance levels of its core.yaml and eval_meta_data.csv.
"""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path, PurePosixPath

from scratchlm.errors import UserError
from scratchlm.files import read_json_lines
from scratchlm.eval.benchmark import Item, Task

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
KINDS = {MC: "choice", SCHEMA: "schema", LM: "lm"}
CORE6 = (("qa_wikidata", LM), ("dyck_languages", LM), ("operators", LM), ("cs_algorithms", LM),
         ("repeat_copy_logic", LM), ("language_identification", MC))
CORE6_SHOTS, DELIMITER = 10, " "
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SUITES = ("core6", "core")


def render(kind: str, records: list[dict], delimiter: str):
    """A task's render function: example i after the shots, in CORE's layout."""
    def one(i: int, shots: list[int]) -> Item:
        r, shown = records[i], [records[s] for s in shots]
        if kind == MC:
            head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shown)
            return Item("choice", [head + r["query"] + delimiter], list(r["choices"]), r["gold"])
        if kind == SCHEMA:
            head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shown)
            return Item("schema", [head + o + delimiter for o in r["context_options"]], [r["continuation"]], r["gold"])
        head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shown)
        return Item("lm", [head + r["context"].strip() + delimiter], [r["continuation"]])
    return one


def core_task(name: str, source: str, kind: str, records: list[dict], *, shots: int = 0, delimiter: str = DELIMITER,
              pools: list[int] | None = None, chance: float | None = None) -> Task:
    return Task(name, source, KINDS[kind], len(records), render(kind, records, delimiter), pools or [0] * len(records),
                shots=shots, rule="mean", field={MC: "choices", SCHEMA: "context_options", LM: "continuation"}[kind],
                chance=chance)


# ---- records ---------------------------------------------------------------------------------------

def kind_of(record: object) -> str | None:
    """The CORE kind a JSONL record is written in, or None for any other record."""
    if not isinstance(record, dict):
        return None
    if "query" in record and "gold" in record:
        return MC
    if "context_options" in record:
        return SCHEMA
    if "context" in record and "continuation" in record:
        return LM
    return None


def check(record: object, kind: str, where: str) -> dict:
    """A CORE record with every field of its kind present and well formed, or one line naming the field."""
    if kind_of(record) != kind:
        raise UserError(f"{where}: not a {kind.replace('_', ' ')} record like the first one")

    def text(key: str) -> str:
        value = record.get(key)
        if not isinstance(value, str):
            raise UserError(f"{where}: field {key!r} is {'missing' if value is None else type(value).__name__}; "
                            "expected text")
        return value

    def options(key: str) -> list[str]:
        value = record.get(key)
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: field {key!r} is an empty choice list" if value == [] else
                            f"{where}: field {key!r} must be a non-empty list of texts")
        if not all(isinstance(v, str) and v for v in value):
            raise UserError(f"{where}: field {key!r} must hold non-empty texts")
        return value

    if kind == LM:
        out = {"context": text("context"), "continuation": text("continuation")}
        if not out["continuation"]:
            raise UserError(f"{where}: field 'continuation' is empty")
        return out
    listed = options("choices" if kind == MC else "context_options")
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(listed):
        raise UserError(f"{where}: field 'gold' must be the index (0 to {len(listed) - 1}) of the right option")
    if kind == MC:
        return {"query": text("query"), "choices": listed, "gold": gold}
    cont = text("continuation")
    if not cont:
        raise UserError(f"{where}: field 'continuation' is empty")
    return {"context_options": listed, "continuation": cont, "gold": gold}


def read_jsonl(path: Path, first_kind: str | None = None) -> tuple[str, list[dict]]:
    """The kind and the checked records of a JSONL file in one of CORE's three kinds."""
    records, kind = [], first_kind
    for n, record in read_json_lines(path):
        where = f"{path}: example {len(records)} (line {n})"
        kind = kind or kind_of(record)
        if kind is None:
            raise UserError(f"{where}: not a CORE record; expected the fields query/choices/gold, "
                            "context_options/continuation/gold or context/continuation")
        records.append(check(record, kind, where))
    if not records:
        raise UserError(f"{path} holds no examples")
    return kind, records


def first_record_kind(path: Path) -> str | None:
    """The CORE kind of a JSONL file's first record, or None when it is in another format."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return kind_of(json.loads(line))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def jsonl_task(path: Path, shots: int = 0) -> Task:
    kind, records = read_jsonl(path)
    return core_task(path.stem, str(path), kind, records, shots=shots)


# ---- core6: CORE's BIG-bench tasks from BIG-bench's files -------------------------------------------

def from_bigbench(task, kind: str, seed: int) -> list[dict]:
    """CORE records of a BIG-bench task: the example in its task's layout, without the task's instructions
    and, for multiple choice, without the list of choices (CORE asks in cloze form: which continuation is
    likeliest; listing eleven language names in every shot would also triple the prompt)."""
    from scratchlm.eval.bigbench import format_input

    out = []
    for i, ex in enumerate(task.examples):
        context = format_input(task, ex, i, seed, list_choices=False).strip()
        if kind == MC:
            if not ex.choices:
                raise UserError(f"{task.source}: CORE scores it as multiple choice, but it has no target_scores")
            out.append({"query": context, "choices": ex.choices, "gold": ex.choices.index(ex.targets[0])})
        else:
            out.append({"context": context, "continuation": ex.targets[0]})
    return out


def core6(seed: int, progress: bool = True) -> list[Task]:
    from scratchlm.eval import bigbench

    tasks = []
    for name, kind in CORE6:
        records, pools = [], []
        for p, (sub, raw) in enumerate(bigbench.find(name, progress)):
            bb = bigbench.read(raw, sub, f"bigbench:{sub}")
            made = from_bigbench(bb, kind, seed)
            records += made
            pools += [p] * len(made)
        tasks.append(core_task(name, f"bigbench:{name}", kind, records, shots=CORE6_SHOTS, pools=pools))
    return tasks


# ---- core: the DCLM eval bundle --------------------------------------------------------------------

def bundle_dir(progress: bool = True) -> Path:
    """The extracted bundle (core.yaml, eval_meta_data.csv, eval_data/), fetched the first time."""
    from scratchlm.fetch import cache_dir, fetch_url
    from scratchlm.files import atomic_dir

    root = cache_dir() / "core" / "eval_bundle"
    if (root / "core.yaml").is_file():
        return root
    try:
        archive = fetch_url(BUNDLE_URL, cache_dir() / "downloads" / "eval_bundle.zip", progress=progress)
    except UserError as e:
        raise UserError(f"--suite core needs the DCLM eval bundle, which could not be fetched ({e}); "
                        "--suite core6 runs offline on BIG-bench's task files") from None
    with zipfile.ZipFile(archive) as z, atomic_dir(root) as tmp:
        for info in z.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or ".." in parts or not parts or parts[0] != "eval_bundle":
                continue
            rest = parts[1:]
            if rest in (("core.yaml",), ("eval_meta_data.csv",)) or (rest[:1] == ("eval_data",) and rest[-1].endswith(".jsonl")):
                dest = tmp.joinpath(*rest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))
        if not (tmp / "core.yaml").is_file():
            raise UserError(f"{archive} has no eval_bundle/core.yaml; delete it and retry")
    archive.unlink()
    return root


def core_tasks(progress: bool = True) -> list[Task]:
    import yaml

    root = bundle_dir(progress)
    config = yaml.safe_load((root / "core.yaml").read_text())
    baselines = {}
    meta = root / "eval_meta_data.csv"
    if meta.is_file():
        with open(meta, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                baselines[row.get("Eval Task", "")] = float(row.get("Random baseline") or 0)
    tasks = []
    for entry in (config or {}).get("icl_tasks", []):
        label, kind = entry["label"], entry["icl_task_type"]
        if kind not in KINDS:
            raise UserError(f"{root / 'core.yaml'}: task {label} has icl_task_type {kind!r}; known: {', '.join(KINDS)}")
        shots = entry.get("num_fewshot", [0])
        path = root / "eval_data" / entry["dataset_uri"]
        _, records = read_jsonl(path, kind)
        tasks.append(core_task(label, str(path), kind, records, shots=shots[0] if isinstance(shots, list) else shots,
                               delimiter=entry.get("continuation_delimiter", DELIMITER),
                               chance=baselines[label] / 100 if label in baselines else None))
    if not tasks:
        raise UserError(f"{root / 'core.yaml'} lists no icl_tasks")
    return tasks


def suite(name: str, seed: int, progress: bool = True) -> list[Task]:
    if name == "core6":
        return core6(seed, progress)
    if name == "core":
        return core_tasks(progress)
    raise UserError(f"--suite {name}: known suites are {', '.join(SUITES)}")
