"""The seeds' ablations on the Shakespeare corpus, on this CPU, with small budgets, written into
docs/experiments.md.

    python bench/experiments.py                    # every ablation, 1 minute of training per run
    python bench/experiments.py --minutes 2        # longer runs
    python bench/experiments.py --steps 100        # equal steps instead of equal time (fair on a busy machine)
    python bench/experiments.py --only positions   # one ablation (positions, activations, tying, lr, seeds, ngram)
    python bench/experiments.py --fill-only        # rewrite the document from the sweeps already on disk

Each ablation is one `scratchlm sweep` over the demo recipe (the `tiny` preset, 4096-token BPE), run as a
subprocess with exactly the command the document shows, into runs/experiments/<name>/. A sweep that
was stopped continues where it was when this script runs again; finished runs are not trained twice.
The document's results sections (between `<!-- results:NAME -->` markers) are then rewritten from each
sweep's sweep.json; nothing else in the document is touched.

Time on an idle 2-core machine, with `--steps 150`: 17 runs of about 100 s each (the steps, the final
evaluation over 174k validation tokens, a checkpoint and a plot), a few minutes of extrapolation
evaluations and a minute of n-gram models: about 35 minutes in all.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scratchlm.runtime import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "experiments.md"
RECIPE = "recipes/shakespeare-cpu.toml"

ABLATIONS = {
    "positions": (["model.position=learned,sinusoidal,rope,alibi,nope"], ["--context", "256,512,1024"]),
    "activations": (["model.mlp=gelu,relu,silu,swiglu"], []),
    "tying": (["model.tie_embeddings=true,false"], []),
    "lr": (["train.lr=3e-4,1e-3,3e-3,1e-2"], []),
    # The demo configuration again under other seeds: the spread of these is the noise floor.
    "seeds": (["train.seed=1,2"], []),
}
NGRAM_ORDERS = (2, 3, 4, 5)
# The demo recipe's own choices; every sweep holds a run with exactly these, a measure of run-to-run noise.
BASELINE = {"model.position": "rope", "model.mlp": "swiglu", "model.tie_embeddings": "true", "train.lr": "3e-3"}


# Short sweeps: a shorter warmup than the recipe's, so that it is a small part of every run.
COMMON = ["--set", "train.warmup_steps=10"]


def sweep_command(name: str, budget: list[str], out_root: Path) -> list[str]:
    """`budget` is ["--minutes", M] (equal time) or ["--steps", N] (equal steps, whatever the load)."""
    grid, extra = ABLATIONS[name]
    cmd = ["scratchlm", "sweep", "--config", RECIPE]
    for g in grid:
        cmd += ["--grid", g]
    return cmd + [*budget, *COMMON, *extra, "--out", str(out_root / name)]


def run(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    exe = [sys.executable, "-m", "scratchlm", *cmd[1:]] if cmd[0] == "scratchlm" else cmd
    subprocess.run(exe, cwd=ROOT, check=True)


def ngram_results(out_root: Path) -> dict:
    """Kneser-Ney baselines on the positions sweep's tokenizer and the same validation text, cached."""
    from scratchlm.eval.lm import ngram_baseline

    path = out_root / "ngram.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    tokenizer = out_root / "positions" / "position-rope" / "tokenizer"
    if not tokenizer.is_dir():
        return done
    for order in NGRAM_ORDERS:
        if str(order) not in done:
            print(f"+ scratchlm eval --baseline ngram --order {order} --checkpoint {out_root / 'positions' / 'position-rope'}",
                  flush=True)
            start = time.perf_counter()
            row = ngram_baseline(order, "shakespeare", tokenizer, progress=False)
            done[str(order)] = {**row, "seconds": time.perf_counter() - start}
            path.write_text(json.dumps(done, indent=1))
    return done


# ---- the document ------------------------------------------------------------------------------------

def _sweep_tables(sweep_dir: Path) -> str:
    """sweep.md from its first table on, its headings demoted to sit inside this page's sections."""
    lines = (sweep_dir / "sweep.md").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    body = [("#### " + line[3:]) if line.startswith("## ") else line for line in lines[start:]]
    return "\n".join(body).strip() or "(no table yet)"


def _summary(name: str, data: dict) -> list[str]:
    """Plain statements read off the numbers: the best run, the spread, and the baseline's bpb."""
    runs = [r for r in data["runs"] if r["status"] == "done"]
    if not runs:
        return ["No finished runs yet."]
    best = min(runs, key=lambda r: r["val_bpb"])
    worst = max(runs, key=lambda r: r["val_bpb"])
    lines = [(f"Lowest validation bits per byte: **{best['name']}** ({best['val_bpb']:.4f}); highest: "
              f"{worst['name']} ({worst['val_bpb']:.4f}); spread {worst['val_bpb'] - best['val_bpb']:.4f} bpb.")]
    fastest = max(runs, key=lambda r: r["tokens"])
    slowest = min(runs, key=lambda r: r["tokens"])
    if fastest is not slowest:
        lines.append(f"Tokens seen in the same budget run from {slowest['tokens']:,} ({slowest['name']}) to "
                     f"{fastest['tokens']:,} ({fastest['name']}): a faster variant also trains on more text.")
    if name == "positions":
        ext = [(r["name"], r.get("extrapolation", {})) for r in runs]
        trained = {n: e.get("256", {}).get("val_bpb") for n, e in ext}
        longest = {n: e.get("1024", {}).get("val_bpb") for n, e in ext}
        for n, at_256 in trained.items():
            if at_256 is not None and longest[n] is not None:
                lines.append(f"{n}: {at_256:.4f} bpb at the training length, {longest[n]:.4f} at 1024 "
                             f"({longest[n] - at_256:+.4f}).")
            elif at_256 is not None:
                lines.append(f"{n}: cannot read past its 256 learned positions.")
    return lines


def _noise(results: dict) -> str:
    """The demo configuration is in every sweep: how far apart its runs land is the noise floor."""
    values = []
    for data in results.values():
        for r in data["runs"]:
            if r["status"] == "done" and all(v == BASELINE.get(k, v) for k, v in r["values"].items()
                                             if k != "train.seed"):
                values.append((r["name"], r["val_bpb"], r["tokens"]))
    if len(values) < 2:
        return ""
    bpbs = [v[1] for v in values]
    return (f"The demo configuration (rope, swiglu, tied, lr 3e-3) ran {len(values)} times (once per sweep, "
            f"and under seeds 1 and 2): {', '.join(f'{n} {b:.4f}' for n, b, _ in values)} bpb (range "
            f"{max(bpbs) - min(bpbs):.4f}). Differences smaller than that range are within run-to-run noise.")


def fill(out_root: Path, budget: list[str], ngram: dict) -> None:
    doc = DOC.read_text()
    results = {n: json.loads((out_root / n / "sweep.json").read_text())
               for n in ABLATIONS if (out_root / n / "sweep.json").is_file()}

    def replace(key: str, body: str) -> None:
        nonlocal doc
        pattern = re.compile(rf"(<!-- results:{key} -->\n).*?(<!-- /results:{key} -->)", re.DOTALL)
        if not pattern.search(doc):
            raise SystemExit(f"{DOC} lacks the markers <!-- results:{key} --> ... <!-- /results:{key} -->")
        doc = pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), doc)

    stamp = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {usable_cpus()} cores, "
             f"`{' '.join(budget)}` per run, by `python bench/experiments.py {' '.join(budget)}`.")
    replace("machine", stamp)
    for name in ABLATIONS:
        if name == "seeds":  # reported in the noise floor
            continue
        if name in results:
            body = "\n".join(["```", shlex.join(sweep_command(name, budget, out_root)), "```", "",
                              _sweep_tables(out_root / name), "", *(f"- {s}" for s in _summary(name, results[name])),
                              "", f"Curves: `{out_root / name / 'sweep.png'}`."])
        else:
            body = "(not run yet)"
        replace(name, body)
    noise = _noise(results)
    replace("noise", noise or "(needs at least two sweeps)")
    if ngram:
        rows = ["| model | val loss | perplexity | val bpb | time |", "|---|---|---|---|---|"]
        for order, r in sorted(ngram.items(), key=lambda kv: int(kv[0])):
            rows.append(f"| {order}-gram Kneser-Ney | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['val_bpb']:.4f} | "
                        f"{r['seconds']:.0f}s |")
        rows.append("")
        rows.append(f"Trained on {next(iter(ngram.values()))['train_tokens']:,} tokens of the train split, scored "
                    f"on the {next(iter(ngram.values()))['val_tokens']:,} validation tokens the transformers are "
                    f"scored on.")
        replace("ngram", "\n".join(rows))
    else:
        replace("ngram", "(not run yet)")
    DOC.write_text(doc)
    print(f"wrote {DOC}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="training budget of each run (default 1)")
    g.add_argument("--steps", type=int, help="training steps of each run instead: equal steps, whatever the load")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join([*ABLATIONS, 'ngram'])}")
    p.add_argument("--out", default="runs/experiments", help="where the sweeps go (default runs/experiments)")
    p.add_argument("--fill-only", action="store_true", help="only rewrite the document from results on disk")
    a = p.parse_args()
    import os

    os.chdir(ROOT)  # the commands, and the paths the document shows, are relative to the repository
    out_root = Path(a.out)
    chosen = a.only.split(",") if a.only else [*ABLATIONS, "ngram"]
    unknown = [c for c in chosen if c not in ABLATIONS and c != "ngram"]
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: choose from {', '.join([*ABLATIONS, 'ngram'])}")
    budget = ["--steps", str(a.steps)] if a.steps else ["--minutes", f"{a.minutes or 1.0:g}"]
    start = time.perf_counter()
    if not a.fill_only:
        for name in ABLATIONS:
            if name in chosen:
                run(sweep_command(name, budget, out_root))
    ngram = ngram_results(out_root) if "ngram" in chosen and not a.fill_only else \
        (json.loads((out_root / "ngram.json").read_text()) if (out_root / "ngram.json").is_file() else {})
    fill(out_root, budget, ngram)
    print(f"total {(time.perf_counter() - start) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
