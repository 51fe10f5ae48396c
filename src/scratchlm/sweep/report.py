"""A sweep's report, read back from its run folders: `sweep.md` (a Markdown table, and the extrapolation
table when context lengths are asked for), `sweep.json` (the same numbers, unrounded) and `sweep.png`
(the runs' curves overlaid). Every number comes from a run's own metrics.jsonl, or, for the
extrapolation table, from evaluating its last checkpoint; nothing is carried over from the training
process, so the report of a sweep that was stopped and resumed reads exactly like an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from scratchlm.errors import UserError


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A killed process can leave its last line half-written; anything else is damage.
                if n < len(lines):
                    raise UserError(f"{path}:{n}: not valid JSON") from None
    return rows


def run_status(run_dir: Path) -> str:
    """done (its final evaluation is logged), partial (some steps logged) or pending (nothing yet)."""
    rows = read_rows(run_dir)
    if any(r.get("final") for r in rows):
        return "done"
    return "partial" if rows else "pending"


def _params(run_dir: Path) -> int | None:
    from scratchlm.config import load_config
    from scratchlm.model.info import count_params

    path = Path(run_dir) / "config.toml"
    return count_params(load_config(path).model)["total"] if path.is_file() else None


def run_summary(run_dir: Path) -> dict:
    """The numbers of one run's table row, from its metrics.jsonl: tokens seen, the final (or else the
    latest) validation loss and bits per byte, training seconds and tokens per training second."""
    rows = read_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    final = next((r for r in reversed(evals) if r.get("final")), None)
    last_eval = final or (evals[-1] if evals else None)
    tokens = max((r.get("tokens", 0) for r in rows), default=0)
    seconds = train[-1]["seconds"] if train else None
    return {"status": run_status(run_dir), "params": _params(run_dir), "step": max((r["step"] for r in rows), default=0),
            "tokens": tokens,
            "val_loss": last_eval["val_loss"] if last_eval else None,
            "val_bpb": last_eval["val_bpb"] if last_eval else None,
            "tokens_per_s": tokens / seconds if seconds else None, "seconds": seconds}


def extrapolation(run_dir: Path, contexts: list[int], eval_tokens: int = 0) -> dict[int, dict]:
    """Validation loss and bits per byte of the run's last checkpoint at each context length, cached in
    the run folder (`extrapolation.json`) by checkpoint, context and token budget."""
    import torch

    from scratchlm.eval.lm import eval_contexts
    from scratchlm.loading import load
    from scratchlm.files import atomic_write_text
    from scratchlm.rundir import resolve_checkpoint
    from scratchlm.runtime import pick_device

    run_dir = Path(run_dir)
    cache_path = run_dir / "extrapolation.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    _, ckpt = resolve_checkpoint(run_dir)

    def key(c: int) -> str:
        return f"{ckpt.name}/context={c}/tokens={eval_tokens}"

    missing = [c for c in contexts if key(c) not in cache]
    if missing:
        device = pick_device("auto")
        loaded = load(run_dir, device)
        with torch.no_grad():
            rows = eval_contexts(loaded, loaded.config.data.dataset, missing, loaded.config.train.micro_batch,
                                 eval_tokens, device, progress=False)
        for c, row in zip(missing, rows):
            cache[key(c)] = row
        atomic_write_text(cache_path, json.dumps(cache, indent=1))
    return {c: cache[key(c)] for c in contexts}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(seconds, 60)
    return f"{int(m)}m {s:04.1f}s" if m else f"{s:.1f}s"


def write_report(out: Path, combos, grid_keys: list[str], *, contexts=(), eval_tokens: int = 0,
                 command: str = "", plot: bool = True) -> dict:
    from scratchlm.files import atomic_write_text
    from scratchlm.viz.plots import plot_runs

    out = Path(out)
    runs = []
    for c in combos:
        summary = run_summary(out / c.name)
        entry = {"name": c.name, "values": c.values, **summary}
        if contexts and summary["status"] == "done":
            entry["extrapolation"] = {str(k): v for k, v in extrapolation(out / c.name, list(contexts), eval_tokens).items()}
        runs.append(entry)

    head = ["run", *grid_keys, "params", "tokens seen", "val loss", "val bpb", "tokens/s", "train time", "status"]
    lines = ["# Sweep", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [("Every number below is read from the run's own `metrics.jsonl`: the final evaluation over the whole "
               "validation split (the latest periodic one while a run is unfinished); train time and tokens/s "
               "count training steps only, not evaluations."), "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["name"], *(r["values"][k] for k in grid_keys), _fmt(r["params"], ","), _fmt(r["tokens"], ","),
                 _fmt(r["val_loss"], ".4f"), _fmt(r["val_bpb"], ".4f"), _fmt(r["tokens_per_s"], ",.0f"),
                 _duration(r["seconds"]), r["status"]]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    if contexts:
        lines += ["", "## Length extrapolation", "",
                  "Validation bits per byte of each finished run's last checkpoint when it reads windows of "
                  "each length (trained at its own `model.context`)"
                  + (f", over the first {eval_tokens:,} validation tokens." if eval_tokens else
                     ", over the whole validation split."), "",
                  "| run | " + " | ".join(f"context {c}" for c in contexts) + " |",
                  "|---|" + "---|" * len(contexts)]
        for r in runs:
            ext = r.get("extrapolation")
            if not ext:
                continue
            cells = [ext[str(c)].get("skipped", "").replace("learned positions stop at", "n/a: learned, max")
                     or f"{ext[str(c)]['val_bpb']:.4f}" for c in contexts]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "sweep.json", json.dumps({"command": command, "grid": grid_keys, "runs": runs}, indent=1))
    started = [out / r["name"] for r in runs if r["status"] != "pending"]
    if started and plot:
        plot_runs(started, out / "sweep.png")
    return {"runs": runs, "grid": grid_keys}
