"""The speedrun records log (records/README.md): the significance rule, reading results, writing an entry.

    python bench/records.py RESULTS.jsonl records/0001-wider.md --note "d_model 192"

RESULTS.jsonl is what `bench/speedrun.py --json` appended: one line per seed, then a summary line per
invocation. An entry is written from the last complete invocation at equal time and the last at equal
steps in it, set against the previous record (the highest-numbered entry beside the new file, or
--previous), and only when the rule makes it a record (exit 1 otherwise), or when it is the first. It
ends with those JSON lines, so that the next entry and `bench/speedrun.py --compare` read the numbers
back from it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's scratchlm, installed or not

import tomli_w  # noqa: E402

from scratchlm.errors import UserError  # noqa: E402
from scratchlm.files import atomic_write_text, read_json_lines  # noqa: E402

ALPHA = 0.05        # one-sided; modded-nanogpt asks 0.01, over more runs than a 5-minute CPU run affords
MIN_RUNS = 3
ENTRY_NAME = re.compile(r"^(\d{4})-[A-Za-z0-9_.-]+\.md$")
SEED_FIELDS = ("run", "seed", "mode", "budget", "val_bpb", "steps", "tokens", "train_seconds")
SUMMARY_FIELDS = ("run", "mode", "budget", "date", "commit", "config", "machine", "matmul_gflops")
# Set per run, not part of what is being compared.
NOT_CONFIG = ("data.tokenizer", "train.seed", "train.minutes", "train.max_steps")


# ----------------------------------------------------------------------------- the test
def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic of mean(a) - mean(b), and its Welch-Satterthwaite degrees of freedom: the
    t-test that does not assume the two samples share a variance (two machines' minutes need not)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs two or more values on each side")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        raise ValueError("both samples are constant: the t statistic is undefined")
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df


def p_lower(t: float, df: float) -> float | None:
    """One-sided p of "the first mean is lower" from Student's t distribution, or None without scipy."""
    try:
        from scipy.stats import t as student
    except ImportError:
        return None
    return float(student.sf(-t, df))


def is_record(p: float | None, n: int, alpha: float = ALPHA) -> bool:
    """The rule: at least MIN_RUNS runs, and p strictly below alpha."""
    return p is not None and n >= MIN_RUNS and p < alpha


def compare(this: list[float], previous: list[float], alpha: float = ALPHA) -> dict:
    """The one-sided test of "this mean is lower", as a row for a JSON line or an entry; "record" applies
    the rule, which is judged at equal time only."""
    t, df = welch(this, previous)
    p = p_lower(t, df)
    if p is None:
        verdict = "undecided: scipy is not installed, so no p-value (pip install scipy)"
    else:
        verdict = f"lower (p < {alpha:g})" if p < alpha else f"not shown lower (p >= {alpha:g})"
    return {"mean": statistics.fmean(this), "previous_mean": statistics.fmean(previous), "n": len(this),
            "previous_n": len(previous), "t": t, "df": df, "p": p, "alpha": alpha,
            "record": is_record(p, len(this), alpha), "verdict": verdict}


def record_verdict(c: dict) -> str:
    if c["record"]:
        return "a record"
    if c["p"] is not None and c["p"] < c["alpha"]:
        return f"not a record: lower, but from fewer than {MIN_RUNS} runs"
    return "not a record"


def describe_test(c: dict) -> str:
    p = "n/a (no scipy)" if c["p"] is None else f"{c['p']:.4g}"
    return (f"mean {c['mean']:.4f} ({c['n']} runs) vs {c['previous_mean']:.4f} ({c['previous_n']} runs): "
            f"Welch t {c['t']:.3f}, df {c['df']:.2f}, one-sided p {p}; {c['verdict']}")


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


# ----------------------------------------------------------------------------- results
def budget_text(mode: str, budget: float) -> str:
    return f"{budget:g} minutes" if mode == "time" else f"{int(budget)} steps"


def _results_lines(path: Path) -> list[tuple[int, object]]:
    """JSON lines of a results file, or of the ```jsonl block that ends a records entry."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a records/ entry or a bench/speedrun.py --json file")
    if path.suffix != ".md":
        return list(read_json_lines(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    block = re.search(r"^```jsonl\n(.*?)^```", text, re.M | re.S)
    if not block:
        raise UserError(f"{path}: no ```jsonl block of results; write entries with bench/records.py")
    first = text[:block.start(1)].count("\n") + 1
    out = []
    for n, line in enumerate(block.group(1).splitlines(), first):
        try:
            if line.strip():
                out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def load_runs(path: Path) -> list[dict]:
    """The complete invocations in a results file or entry, oldest first: each summary line with its seed
    lines under "rows". Seed lines without a summary (an invocation that was stopped) are left out."""
    seeds: dict[str, list[dict]] = {}
    runs = []
    for n, value in _results_lines(Path(path)):
        kind = value.get("kind") if isinstance(value, dict) else None
        needed = {"seed": SEED_FIELDS, "summary": SUMMARY_FIELDS}.get(kind)
        if needed is None or any(k not in value for k in needed) or value["mode"] not in ("time", "steps") \
                or kind == "seed" and not all(_number(value[k]) for k in ("val_bpb", "steps", "tokens", "train_seconds")):
            raise UserError(f"{path}:{n}: not a line of bench/speedrun.py --json (a seed or summary object)")
        if kind == "seed":
            seeds.setdefault(value["run"], []).append(value)
        else:
            runs.append({**value, "rows": seeds.pop(value["run"], [])})
    for run in runs:
        if not run["rows"]:
            raise UserError(f"{path}: the summary of run {run['run']} has no seed lines before it")
    return runs


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pick(runs: list[dict], path: Path, mode: str, budget: float | None = None) -> dict:
    """The last run at this kind of budget (and this budget, when given)."""
    for run in reversed(runs):
        if run["mode"] == mode and (budget is None or run["budget"] == budget):
            return run
    held = ", ".join(sorted({budget_text(r["mode"], r["budget"]) for r in runs})) or "no complete runs"
    want = budget_text(mode, budget) if budget is not None else ("equal time" if mode == "time" else "equal steps")
    raise UserError(f"{path}: no runs at {want} (it holds: {held})")


def bpb(run: dict) -> list[float]:
    return [row["val_bpb"] for row in run["rows"]]


# ----------------------------------------------------------------------------- entries
def flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(config: dict, previous: dict) -> list[str]:
    """`--set` lines that turn the previous record's configuration into this one."""
    new, old = flat(config), flat(previous)
    lines = []
    for key in sorted(set(new) | set(old)):
        if key in NOT_CONFIG or new.get(key) == old.get(key):
            continue
        if key not in new:
            lines.append(f"# {key} is gone (was {old[key]!r})")
        else:
            lines.append(f"--set {key}={tomli_w.dumps({'v': new[key]})[4:].strip()}")
    return lines


def previous_entry(out: Path) -> Path | None:
    number = int(ENTRY_NAME.match(out.name).group(1))
    older = [p for p in out.parent.glob("*.md") if (m := ENTRY_NAME.match(p.name)) and int(m.group(1)) < number]
    return max(older, key=lambda p: p.name) if older else None


def _rates(run: dict) -> str:
    m = run["matmul_gflops"]
    return "; ".join(f"{when}: fp32 {m[when]['fp32']:.1f}, bf16 {m[when]['bf16']:.1f}" for when in ("start", "end"))


def _section(run: dict) -> list[str]:
    mean, sd = spread(bpb(run))
    lines = [f"## Equal {'time' if run['mode'] == 'time' else 'steps'}: {budget_text(run['mode'], run['budget'])}",
             "", f"Commit {run['commit']}, {run['date']}.", "",
             "| seed | val bpb | steps | tokens | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['val_bpb']:.4f} | {r['steps']} | {r['tokens']:,} | {r['train_seconds']:.1f} |"
              for r in run["rows"]]
    sd_text = "n/a (one run)" if sd is None else f"{sd:.4f}"
    return lines + ["", f"Mean **{mean:.4f}**, sample standard deviation {sd_text}, {len(run['rows'])} runs.",
                    "", f"Matmul GFLOP/s (2048^3) at the {_rates(run)}.", ""]


def _test_row(name: str, run: dict, old: dict | None, alpha: float) -> str:
    if old is None:
        return f"| {name} | | | | | | not compared: the previous record has no runs at this budget |"
    try:
        c = compare(bpb(run), bpb(old), alpha)
    except ValueError as e:
        return f"| {name} | | | | | | no t-test: {e} |"
    p = "n/a" if c["p"] is None else f"{c['p']:.4g}"
    return (f"| {name} | {c['mean']:.4f} | {c['previous_mean']:.4f} | {c['t']:.3f} | {c['df']:.2f} | {p} | "
            f"{c['verdict']} |")


def write_entry(results: Path, out: Path, previous: Path | None, note: str = "",
                alpha: float = ALPHA) -> tuple[bool, str]:
    """Write the entry `out` from the results file when its runs make a record (or it is the first entry);
    return whether it was written, and the verdict."""
    if not ENTRY_NAME.match(out.name):
        raise UserError(f"{out}: name an entry NNNN-name.md, numbered after the last one in records/")
    if out.exists():
        raise UserError(f"{out}: exists; an entry is written once, so give the next number")
    runs = load_runs(results)
    timed, stepped = pick(runs, results, "time"), pick(runs, results, "steps")
    for run, least in ((timed, MIN_RUNS), (stepped, 2)):
        if len(run["rows"]) < least:
            raise UserError(f"{results}: the last run at {budget_text(run['mode'], run['budget'])} has "
                            f"{len(run['rows'])} seeds; an entry needs {least} or more (bench/speedrun.py --seeds)")
    lines = [f"# {out.stem}", ""]
    if note:
        lines += [note, ""]
    machine = timed["machine"]
    lines += [f"- date: {timed['date']}", f"- commit: {timed['commit']}",
              f"- machine: {machine['cpu']}; flags {' '.join(machine['cpu_flags']) or 'none of note'}; "
              f"{machine['threads']} threads; torch {machine['torch']}"]
    if previous is None:
        lines += ["- previous record: none (the first entry)", "- verdict: the baseline", ""]
        verdict = "the baseline (first entry)"
    else:
        old_runs = load_runs(previous)
        old_timed = pick(old_runs, previous, "time")
        if old_timed["budget"] != timed["budget"]:
            raise UserError(f"{previous}: ran {budget_text('time', old_timed['budget'])}, these runs "
                            f"{budget_text('time', timed['budget'])}; a record is judged at the same budget")
        try:
            c = compare(bpb(timed), bpb(old_timed), alpha)
        except ValueError as e:
            return False, f"not a record: no t-test ({e})"
        verdict = f"{record_verdict(c)}: {describe_test(c)}"
        if not c["record"]:
            return False, verdict
        old_stepped = next((r for r in reversed(old_runs) if r["mode"] == "steps"
                            and r["budget"] == stepped["budget"]), None)
        diff = config_diff(timed["config"], old_timed["config"]) or ["(none: the same configuration)"]
        if old_timed["machine"]["cpu"] != machine["cpu"]:
            lines.append(f"- **another CPU than the previous record's** ({old_timed['machine']['cpu']})")
        lines += [f"- previous record: [{previous.name}]({previous.name})", f"- verdict: {verdict}", "",
                  "## Configuration against the previous record", "", *[f"    {d}" for d in diff], "",
                  f"## Welch t-test against {previous.stem} (one-sided: this mean is lower; alpha {alpha:g})", "",
                  "| budget | this mean | previous mean | t | df | p | verdict |", "|---|---|---|---|---|---|---|",
                  _test_row(budget_text("time", timed["budget"]), timed, old_timed, alpha),
                  _test_row(budget_text("steps", stepped["budget"]), stepped, old_stepped, alpha), ""]
    lines += [*_section(timed), *_section(stepped)]
    raw = [json.dumps(row) for run in (timed, stepped)
           for row in [*run["rows"], {k: v for k, v in run.items() if k != "rows"}]]
    lines += ["## Results", "", "The JSON lines this entry was written from (bench/speedrun.py --compare reads them).",
              "", "```jsonl", *raw, "```", ""]
    atomic_write_text(out, "\n".join(lines))
    return True, verdict


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="the bench/speedrun.py --json file")
    p.add_argument("entry", type=Path, help="the entry to write, records/NNNN-name.md")
    p.add_argument("--previous", type=Path, help="the previous record (default: the highest-numbered entry "
                                                 "before this one in the same folder)")
    p.add_argument("--note", default="", help="a line saying what changed")
    p.add_argument("--alpha", type=float, default=ALPHA)
    a = p.parse_args()
    try:
        if not 0 < a.alpha < 1:
            raise UserError(f"--alpha {a.alpha}: give a significance level between 0 and 1, e.g. 0.05")
        if a.previous is not None and not a.previous.is_file():
            raise UserError(f"--previous {a.previous}: no such file")
        previous = a.previous if a.previous is not None or not ENTRY_NAME.match(a.entry.name) \
            else previous_entry(a.entry)
        written, verdict = write_entry(a.results, a.entry, previous, a.note, a.alpha)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"{verdict}\nnothing written: records/ holds records only (a result that is not one belongs in "
              f"docs/journal.md)", file=sys.stderr)
        return 1
    print(f"wrote {a.entry}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
