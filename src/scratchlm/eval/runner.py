"""What `scratchlm eval --suite/--task` and `--compare` do: find the tasks, score a checkpoint on them,
print the table and write the summary, the per-example rows and the chart."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.eval import report
from scratchlm.eval.benchmark import DEFAULT_SEED, Task, run_task

# --limit when a suite is run without one: core6 on SmolLM2-135M then takes minutes, not hours, on a 2-core CPU
# (docs/evaluation.md); --limit 0 scores every example.
SUITE_LIMIT = 50


def is_benchmark(spec: str) -> bool:
    """Whether a --task names a benchmark task (BIG-bench, or a JSONL file in one of CORE's kinds) rather
    than a plain task file of questions and answers (eval/tasks.py)."""
    from scratchlm.eval.core import first_record_kind

    if spec.startswith("bigbench:") or spec.endswith(".json"):
        return True
    return Path(spec).is_file() and first_record_kind(Path(spec)) is not None


def load_tasks(suite: str | None, specs: Sequence[str], seed: int, progress: bool = True) -> list[Task]:
    from scratchlm.eval import bigbench, core

    tasks = core.suite(suite, seed, progress) if suite else []
    for spec in specs:
        if spec.startswith("bigbench:") or spec.endswith(".json"):
            tasks += bigbench.load(spec, seed, progress)
        elif Path(spec).is_file():
            tasks.append(core.jsonl_task(Path(spec)))
        else:
            raise UserError(f"--task {spec}: not a file, nor bigbench:NAME")
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"the task {twice[0]} is named twice; give each task once")
    return tasks


def label_of(suite: str | None, specs: Sequence[str]) -> str:
    from scratchlm.fetch import slug

    parts = ([suite] if suite else []) + [Path(s.removeprefix("bigbench:")).stem if s.endswith(".json") or
                                          s.endswith(".jsonl") else s.removeprefix("bigbench:") for s in specs]
    return slug("+".join(parts))


def evaluate(checkpoint: str, suite: str | None, specs: Sequence[str], *, shots: int | None = None,
             limit: int | None = None, seed: int = DEFAULT_SEED, out: str | None = None, device: str = "auto",
             batch: int = 16, progress: bool = True) -> dict:
    """Score one checkpoint; print the table; write summary.json, examples.jsonl and scores.png into `out`
    (default: the run folder's eval/<suite or tasks>/). Returns the summary."""
    from scratchlm.loading import load
    from scratchlm.rundir import resolve_checkpoint
    from scratchlm.runtime import pick_device

    check_numbers(shots, limit, batch)
    if limit is None:
        limit = SUITE_LIMIT if suite else 0
    run_dir, _ = resolve_checkpoint(checkpoint)
    tasks = load_tasks(suite, specs, seed, progress)
    loaded = load(checkpoint, pick_device(device))
    results = []
    for task in tasks:
        if task.note and progress:
            print(f"{task.name}: {task.note}")
        result = run_task(loaded.model, loaded.tokenizer, task, shots=shots, limit=limit, seed=seed, batch=batch,
                          progress=progress)
        results.append(result)
        if progress:
            print(f"{task.name}: accuracy {100 * result.accuracy:.1f}% on {result.examples} examples "
                  f"({result.examples / max(result.seconds, 1e-9):.2f} examples/s)", file=sys.stderr, flush=True)
    label = label_of(suite, specs)
    doc = report.summary(results, model=str(loaded.checkpoint), suite=suite, tasks_given=list(specs), shots=shots,
                         limit=limit, seed=seed, context=loaded.model.config.context)
    where = Path(out) if out else run_dir / "eval" / label
    report.write(where, results, doc, run_dir.name)
    print(report.table(doc))
    print(f"wrote {where / report.SUMMARY}, {where / report.EXAMPLES} (every example) and {where / report.CHART}")
    return doc


def compare(sources: Sequence[str], suite: str | None, specs: Sequence[str], *, out: str | None = None,
            **settings) -> list[tuple[str, dict]]:
    """Several runs side by side: each source is a run folder (scored now) or a summary.json (read)."""
    if len(sources) < 2:
        raise UserError("--compare needs two or more runs (run folders or summary.json files)")
    runs = []
    for src in sources:
        path = Path(src)
        if path.is_file() and path.suffix == ".json":
            doc = report.read_summary(path)
            # named after its run folder (the checkpoint's grandparent), as a scored run folder is
            model = Path(str(doc.get("model") or path))
            runs.append((model.parent.parent.name or path.parent.name, doc))
            continue
        if not (suite or specs):
            raise UserError(f"--compare {src}: say what to score with --suite or --task (or give summary.json files)")
        runs.append((path.name, evaluate(src, suite, specs, **settings)))
    labels = [label for label, _ in runs]
    if len(set(labels)) < len(labels):
        runs = [(f"{label} ({i + 1})", doc) for i, (label, doc) in enumerate(runs)]
    from scratchlm.files import atomic_write_text, make_dir

    where = Path(out or "eval-compare")
    make_dir(where)
    import json

    atomic_write_text(where / "compare.json", json.dumps([{"run": label, **doc} for label, doc in runs], indent=2) + "\n")
    report.chart(runs, where / "compare.png")
    print(report.compare_table(runs))
    print(f"wrote {where / 'compare.json'} and {where / 'compare.png'}")
    return runs


def check_numbers(shots: int | None, limit: int | None, batch: int) -> None:
    if shots is not None and shots < 0:
        raise UserError(f"--shots {shots}: give a number of examples to show first, 0 or more")
    if limit is not None and limit < 0:
        raise UserError(f"--limit {limit}: give a number of examples per task >= 1, or 0 for all")
    if batch < 1:
        raise UserError(f"--batch {batch}: score at least 1 example at a time")
