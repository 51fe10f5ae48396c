"""BIG-bench tasks: the task files from the `bigbench` package on PyPI, and how a `task.json` is read and
scored.

`scratchlm data get bigbench` downloads the package's 358 MB source archive once (resumable), keeps only
its 1,041 `task.json` files, each gzipped, under `cache_dir()/bigbench/1.0.0/` (about 1.7 GB of JSON
stored in a fraction of that), and deletes the archive. A task is named by its folder:
`bigbench:operators`, `bigbench:cs_algorithms/lcs`; a task made of subtasks (`bigbench:cs_algorithms`)
is all of them. Any local `task.json` in the same format works without the download.

A task is scored by the first of its metrics that scratchlm computes, as BIG-bench computes it:
`multiple_choice_grade` (the choice with the highest log-likelihood after the prompt earns its
`target_scores` value; chance is the mean share of credit among the choices) or `exact_str_match` (the
greedy continuation, cut at the task's stop string, then reduced to the first match of its `output_regex`,
must equal one of the targets exactly; chance is 0). Prompts follow BIG-bench's own layout: the task
prefix, then the shots and the question joined by the task's separator, each input wrapped in the task's
input and output prefixes, with the choices listed after the input where the task asks for it (in a
shuffled order fixed by the seed). Shots are drawn from the same subtask with a fixed seed, never the
example under test, and show the first target.
"""
from __future__ import annotations

import difflib
import gzip
import json
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from scratchlm.errors import UserError
from scratchlm.fetch import cache_dir, fetch_url, say

VERSION = "1.0.0"
SDIST = f"bigbench-{VERSION}.tar.gz"
SDIST_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
             + SDIST)
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_IN = "bigbench/benchmark_tasks"
INDEX = "tasks.txt"          # written last: its presence says the folder is complete
DESCRIPTION = (f"Evaluation tasks: bigbench, BIG-bench's 1,041 task files (PyPI sdist bigbench=={VERSION}, a 358 MB "
               "download once); score them with scratchlm eval --task bigbench:NAME or --suite core6")

# Every metric BIG-bench defines; of these scratchlm computes the first two, and skips the others.
SCORED = ("multiple_choice_grade", "exact_str_match")
KNOWN_METRICS = SCORED + ("bleu", "bleurt", "case_insensitive_str_match", "sequence_f1",
                          "numeric_match_with_0_1_relative_error", "rouge", "log_likelihood",
                          "calibration_multiple_choice_brier_score", "expected_calibration_error",
                          "weighted_log_probabilities", "weighted_probabilities", "macro_f1")
DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # BIG-bench's, for a generative task that gives neither stop string nor regex


# ---- the task files --------------------------------------------------------------------------------

def tasks_dir() -> Path:
    return cache_dir() / "bigbench" / VERSION


def fetch(progress: bool = True) -> Path:
    """The folder of gzipped task files, downloaded and extracted the first time."""
    from scratchlm.files import atomic_dir

    root = tasks_dir()
    if (root / INDEX).is_file():
        return root
    archive = download(progress)
    say(progress, f"keeping the task.json files of {archive.name} in {root}")
    names = []
    with atomic_dir(root) as tmp:
        # Members are read into memory and written under a name built from checked parts, so no member
        # name (absolute, ../, a link) can place a file outside the folder.
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = _task_name(member)
                if name is None:
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                dest = tmp.joinpath(*name.split("/"), "task.json.gz")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
                names.append(name)
        if not names:
            raise UserError(f"{archive} holds no {TASKS_IN}/*/task.json files; delete it and retry")
        (tmp / INDEX).write_text("".join(n + "\n" for n in sorted(names)))
    archive.unlink()
    say(progress, f"{len(names)} BIG-bench task files in {root}")
    return root


def fetch_for_cli(out: str | None) -> str:
    """`scratchlm data get bigbench`: fetch, and say where the task files are."""
    if out:
        raise UserError("--out: BIG-bench's task files stay in the cache; scratchlm eval reads them from there")
    root = fetch()
    return f"{len(task_names(root))} BIG-bench task files in {root} (score one with scratchlm eval --task bigbench:NAME)"


def download(progress: bool) -> Path:
    """The sdist, fetched over HTTP rather than with pip: pip refuses to download it, since its setup
    declares a dependency by a local file URL. The file is pinned by its SHA-256."""
    return fetch_url(SDIST_URL, cache_dir() / "downloads" / SDIST, sha256=SDIST_SHA256, progress=progress)


def _task_name(member: tarfile.TarInfo) -> str | None:
    """'cs_algorithms/lcs' for a regular file .../bigbench/benchmark_tasks/cs_algorithms/lcs/task.json."""
    parts = PurePosixPath(member.name).parts
    if not member.isfile() or parts[-1:] != ("task.json",):
        return None
    try:
        at = next(i for i in range(len(parts) - 1) if parts[i:i + 2] == ("bigbench", "benchmark_tasks"))
    except StopIteration:
        return None
    name = parts[at + 2:-1]
    if not name or any(p in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9_.+-]+", p) for p in name):
        return None
    return "/".join(name)


def task_names(root: Path) -> list[str]:
    return (root / INDEX).read_text().split()


def find(name: str, progress: bool = True) -> list[tuple[str, bytes]]:
    """The (name, JSON bytes) of task `name` in the cache, or of each of its subtasks; fetched on first use."""
    root = fetch(progress)
    names = task_names(root)
    known = set(names)
    if name in known and _has_examples(root, name):
        picked = [name]
    else:
        picked = [n for n in names if n.startswith(name + "/")]
    if not picked:
        tops = sorted({n.split("/")[0] for n in names} | known)
        close = difflib.get_close_matches(name, tops, n=5, cutoff=0.6) or [t for t in tops if name in t][:5]
        hint = f"; close: {', '.join('bigbench:' + c for c in close)}" if close else ""
        raise UserError(f"no BIG-bench task 'bigbench:{name}'{hint} ({len(tops)} tasks in {root})")
    return [(n, gzip.decompress((root / n / "task.json.gz").read_bytes())) for n in picked]


def _has_examples(root: Path, name: str) -> bool:
    # A task made of subtasks keeps a task.json of its own with a description and no examples.
    return b'"examples"' in gzip.decompress((root / name / "task.json.gz").read_bytes())


# ---- reading a task.json ---------------------------------------------------------------------------

@dataclass
class Example:
    input: str
    targets: list[str]              # the right answers; for multiple choice, the best-graded choices
    choices: list[str] = field(default_factory=list)
    grades: list[float] = field(default_factory=list)


@dataclass
class BigBenchTask:
    name: str
    source: str                     # the file, for messages
    metric: str                     # one of SCORED
    preferred: str
    examples: list[Example]
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    separator: str = "\n"
    append_choices: bool = True
    stop_string: str | None = None
    output_regex: str | None = None


def _str(doc: dict, key: str, default: str, where: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return value


def read(raw: bytes | str, name: str, source: str) -> BigBenchTask:
    """A task file's examples and settings, every field checked; a mistake names the file, the example
    and the field."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{source}: a BIG-bench task file holds one JSON object")
    metrics = doc.get("metrics")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{source}: field 'metrics' must be a non-empty list of metric names")
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise UserError(f"{source}: field 'metrics' names an unknown metric {unknown[0]!r}; BIG-bench's are "
                        f"{', '.join(KNOWN_METRICS)}")
    scored = [m for m in SCORED if m in metrics]
    if not scored:
        raise UserError(f"{source}: field 'metrics' is {metrics}; scratchlm scores {' or '.join(SCORED)}")
    preferred = doc.get("preferred_score", scored[0])
    # A task that lists both is scored the way it prefers, else multiple choice first.
    metric = preferred if preferred in scored else scored[0]
    examples = doc.get("examples")
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{source}: field 'examples' must be a non-empty list")
    task = BigBenchTask(
        name, source, metric, str(preferred), [],
        task_prefix=_str(doc, "task_prefix", "", source),
        input_prefix=_str(doc, "example_input_prefix", "\nQ: ", source),
        output_prefix=_str(doc, "example_output_prefix", "\nA: ", source),
        choice_prefix=_str(doc, "choice_prefix", "\n  choice: ", source),
        separator=_str(doc, "few_shot_example_separator", "\n", source),
    )
    append = doc.get("append_choices_to_input", True)
    if isinstance(append, str) and append.lower() in ("true", "false"):  # a few task files quote it
        append = append.lower() == "true"
    if not isinstance(append, bool):
        raise UserError(f"{source}: field 'append_choices_to_input' must be true or false, got {append!r}")
    task.append_choices = append
    for key in ("stop_string", "output_regex"):
        if doc.get(key) is not None:
            setattr(task, key, _str(doc, key, "", source))
    if task.metric == "exact_str_match":
        if task.stop_string is None and task.output_regex is None:
            task.output_regex = DEFAULT_REGEX
        if task.output_regex is not None:
            try:
                groups = re.compile(task.output_regex).groups
            except re.error as e:
                raise UserError(f"{source}: field 'output_regex' is not a regular expression ({e})") from None
            if groups > 1:
                raise UserError(f"{source}: field 'output_regex' has {groups} groups; keep one at most")
    task.examples = [_example(e, i, task.metric, source) for i, e in enumerate(examples)]
    return task


def _example(record: object, index: int, metric: str, source: str) -> Example:
    where = f"{source}: example {index}"
    if not isinstance(record, dict):
        raise UserError(f"{where}: must be an object with 'input' and 'target' or 'target_scores'")
    text = record.get("input")
    if not isinstance(text, str):
        raise UserError(f"{where}: field 'input' is {'missing' if text is None else type(text).__name__}; "
                        "expected text")
    if metric == "multiple_choice_grade":
        scores = record.get("target_scores")
        if not isinstance(scores, dict):
            raise UserError(f"{where}: field 'target_scores' is missing; a multiple-choice example maps each "
                            "choice to its score")
        if not scores:
            raise UserError(f"{where}: field 'target_scores' is an empty choice list")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise UserError(f"{where}: field 'target_scores' must map each choice to a number")
        if any(not c for c in scores):
            raise UserError(f"{where}: field 'target_scores' holds an empty choice")
        best = max(scores.values())
        if len(scores) > 1 and best <= min(scores.values()) or best <= 0 and len(scores) == 1:
            raise UserError(f"{where}: field 'target_scores' gives no choice more credit than the others")
        choices = list(scores)
        return Example(text, [c for c in choices if scores[c] == best], choices, [float(scores[c]) for c in choices])
    target = record.get("target")
    targets = target if isinstance(target, list) else [target]
    if target is None or not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{where}: field 'target' must be text or a non-empty list of texts")
    return Example(text, list(targets))


# ---- prompts ---------------------------------------------------------------------------------------

def format_input(task: BigBenchTask, example: Example, index: int, seed: int, list_choices: bool = True) -> str:
    """One example's input in the task's layout, up to where the answer goes."""
    text = example.input
    if example.choices and task.append_choices and list_choices:
        listed = sorted(example.choices)
        random.Random(f"{seed}/{index}").shuffle(listed)
        text += task.choice_prefix + task.choice_prefix.join(listed)
    return task.input_prefix + text + task.output_prefix


def prompt(task: BigBenchTask, index: int, shots: list[int], seed: int) -> str:
    shown = [format_input(task, task.examples[s], s, seed) + task.examples[s].targets[0] for s in shots]
    return task.task_prefix + task.separator.join(shown + [format_input(task, task.examples[index], index, seed)])


def answer(task: BigBenchTask, text: str) -> str:
    """A greedy continuation reduced as BIG-bench reduces it before matching (the stop string is already
    cut off by generation)."""
    if task.output_regex is None:
        return text
    return next(iter(re.findall(task.output_regex, text)), "")


# ---- as benchmark tasks ----------------------------------------------------------------------------

def as_task(task: BigBenchTask, seed: int):
    """A benchmark task scored by the task's metric, in its own prompt layout."""
    from scratchlm.eval.benchmark import Item, Task

    def render(i: int, shots: list[int]) -> Item:
        ex, text = task.examples[i], prompt(task, i, shots, seed)
        if task.metric == "multiple_choice_grade":
            return Item("choice", [text], ex.choices, ex.choices.index(ex.targets[0]), ex.grades)
        return Item("generate", [text], ex.targets)

    mc = task.metric == "multiple_choice_grade"
    note = "" if task.preferred == task.metric else f"scored by {task.metric} (the task prefers {task.preferred})"
    return Task(task.name, task.source, "choice" if mc else "generate", len(task.examples), render,
                [0] * len(task.examples), field="target_scores" if mc else "target",
                answer=None if mc else (lambda text: answer(task, text)),
                stop=(task.stop_string,) if task.stop_string else (), note=note)


def load(spec: str, seed: int, progress: bool = True) -> list:
    """`bigbench:NAME` (one task per subtask) or a local task.json file, as benchmark tasks."""
    if spec.startswith("bigbench:"):
        found = find(spec.removeprefix("bigbench:").strip("/"), progress)
        return [as_task(read(raw, name, f"bigbench:{name}"), seed) for name, raw in found]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    raw = path.read_bytes()
    try:
        name = json.loads(raw).get("name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        name = None
    return [as_task(read(raw, name if isinstance(name, str) and name else path.parent.name or path.stem, str(path)),
                    seed)]
