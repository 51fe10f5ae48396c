"""Benchmark results as a table, a JSON summary, per-example JSONL and a bar chart; and several runs'
summaries side by side (`--compare`)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.eval.benchmark import TaskResult, core_score
from scratchlm.files import atomic_write_text, make_dir

SUMMARY, EXAMPLES, CHART = "summary.json", "examples.jsonl", "scores.png"


def summary(results: Sequence[TaskResult], **settings) -> dict:
    return {**settings, "core": core_score(results), "seconds": round(sum(r.seconds for r in results), 2),
            "tasks": [r.summary() for r in results]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _centred(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _time(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 90 else f"{seconds / 60:.1f}min"


def table(doc: dict) -> str:
    """The per-task table of one summary, with CORE's average under it."""
    head = ("task", "kind", "shots", "examples", "accuracy", "chance", "centred", "cut", "time")
    rows = [head] + [(t["task"], t["kind"], str(t["shots"]), str(t["examples"]), _pct(t["accuracy"]), _pct(t["chance"]),
                      _centred(t["centred"]), str(t["cut"]), _time(t["seconds"])) for t in doc["tasks"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    n = sum(1 for t in doc["tasks"] if t["centred"] is not None)
    lines.append(f"CORE-style score (mean centred accuracy over {n} tasks): {_centred(doc['core'])}; "
                 f"{sum(t['examples'] for t in doc['tasks'])} examples in {_time(doc['seconds'])}")
    cut = sum(t["cut"] for t in doc["tasks"])
    if cut:
        lines.append(f"{cut} examples had prompts longer than the model's context; their oldest tokens were cut")
    return "\n".join(lines)


def write(out: Path, results: Sequence[TaskResult], doc: dict, label: str) -> None:
    """summary.json, examples.jsonl (one line per example, every task) and scores.png in `out`."""
    make_dir(out)
    atomic_write_text(out / SUMMARY, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / EXAMPLES, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                               for r in results for row in r.rows))
    chart([(label, doc)], out / CHART)


def chart(runs: Sequence[tuple[str, dict]], out: Path) -> Path:
    """Centred accuracy per task, one bar per run, and the CORE-style average last."""
    import numpy as np

    from scratchlm.viz.plots import plt, save_figure

    names = list(dict.fromkeys(t["task"] for _, doc in runs for t in doc["tasks"])) + ["CORE"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(1, len(runs)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(runs)
    x = np.arange(len(names))
    for k, (label, doc) in enumerate(runs):
        by = {t["task"]: t["centred"] for t in doc["tasks"]}
        by["CORE"] = doc.get("core")
        values = [by.get(n) if by.get(n) is not None else np.nan for n in names]
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, values, width, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("centred accuracy (0 = chance, 1 = perfect)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def read_summary(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a summary.json scratchlm eval wrote ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise UserError(f"{path}: not a summary.json scratchlm eval wrote (no 'tasks' list)")
    return doc


def compare_table(runs: Sequence[tuple[str, dict]]) -> str:
    """Tasks down, runs across: accuracy and centred accuracy of each."""
    names = list(dict.fromkeys(t["task"] for _, doc in runs for t in doc["tasks"]))
    head = ["task"] + [label for label, _ in runs]
    rows = [head]
    for n in names:
        cells = [n]
        for _, doc in runs:
            t = next((t for t in doc["tasks"] if t["task"] == n), None)
            cells.append("-" if t is None else f"{_pct(t['accuracy'])} ({_centred(t['centred'])})")
        rows.append(cells)
    rows.append(["CORE"] + [_centred(doc.get("core")) for _, doc in runs])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines) + "\naccuracy (centred accuracy) per task"
