"""Human evaluation (`scratchlm rate`): samples from several checkpoints for the same prompts, shown one
at a time without saying which checkpoint wrote them, in a shuffled order fixed by a seed, each rated 1-5
for fluency, coherence and relevance. Ratings go to a CSV file a row at a time, so a session can stop at
any point and the next one, with the same command, skips what is already rated. `--summary` prints each
checkpoint's mean, standard deviation and count per criterion.

Each sample is drawn with a seed made from the run's seed and the prompt's index, so a checkpoint's
sample for a prompt is the same in every session, whatever order it is shown in.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import TextIO

from scratchlm.errors import UserError
from scratchlm.files import make_dir
from scratchlm.infer.prompt import plain_prompt, read_prompt
from scratchlm.infer.sampling import SAMPLING, SamplingParams

CRITERIA = ("fluency", "coherence", "relevance")
SEED_STRIDE = 100_003                      # a sample's seed: the run's seed times this, plus the prompt's index
MAX_SEED = 2**40                           # so that every sample's seed is one torch takes (under 2**64)
FIELDS = ("checkpoint", "prompt", "sample", *CRITERIA, "rated_at")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, its escapes read as `generate --prompt` reads them (`\\n` for a
    line break), or the "prompt" field of each line of a .jsonl file. Blank lines are skipped."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f"{path}:{n}: expected an object with a text field 'prompt'")
            prompts.append(read_prompt(record["prompt"], escapes=False, flag=f"{path}:{n}"))
        else:
            prompts.append(read_prompt(line, flag=f"{path}:{n}"))
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    if len(set(prompts)) != len(prompts):
        raise UserError(f"{path}: a prompt appears twice; ratings are keyed by prompt, so each must be unique")
    return prompts


def read_ratings(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: not a ratings file (missing column {missing[0]!r})")
        rows = []
        for n, row in enumerate(reader, 2):
            for c in CRITERIA:
                if row[c] not in ("1", "2", "3", "4", "5"):
                    raise UserError(f"{path}:{n}: {c} is {row[c]!r}; ratings are whole numbers from 1 to 5")
            rows.append(row)
    return rows


def parse_rating(text: str) -> tuple[int, int, int] | None:
    """Three ratings from "4 3 5", "4,3,5" or "435"; None for anything else."""
    parts = [p for p in re.split(r"[\s,;/]+", text.strip()) if p]
    if len(parts) == 1 and len(parts[0]) == 3:
        parts = list(parts[0])
    if len(parts) != 3 or any(p not in ("1", "2", "3", "4", "5") for p in parts):
        return None
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


class Samples:
    """Loads each checkpoint once, when its first sample is needed, and draws seeded samples."""

    def __init__(self, params: SamplingParams, seed: int, device: str):
        self.params, self.seed, self.device = params, seed, device
        self.loaded: dict[str, object] = {}

    def __call__(self, checkpoint: str, prompt: str, index: int) -> str:
        from scratchlm.chat.template import Prompter
        from scratchlm.infer.generate import complete
        from scratchlm.loading import load
        from scratchlm.runtime import pick_device

        if checkpoint not in self.loaded:
            self.loaded[checkpoint] = load(checkpoint, pick_device(self.device))
        run = self.loaded[checkpoint]
        tok = run.tokenizer
        prompter = Prompter(tok)
        if prompter.templated:
            ids = prompter.prompt([{"role": "user", "content": prompt}])
            stops, stop_text = prompter.stop_ids, prompter.stop_strings
        else:
            ids, stops = plain_prompt(tok, prompt)
            stop_text = ()
        params = dataclasses.replace(self.params, seed=self.seed * SEED_STRIDE + index, stop_ids=stops, stop=stop_text)
        return complete(run.model, tok, ids, params).text


def rate(checkpoints: list[str], prompts_path: Path, out: Path, *, seed: int = 0,
         params: SamplingParams = SAMPLING["rate"], device: str = "auto", sampler=None,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Ask for ratings of every (checkpoint, prompt) pair not yet in `out`, sampled with `params` (each
    sample seeded by `seed` and its prompt); return how many were given."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: give a whole number from 0 to {MAX_SEED}")
    if len(checkpoints) < 1:
        raise UserError("name the checkpoints to compare: --checkpoint A --checkpoint B ...")
    labels = [str(Path(c)) for c in checkpoints]
    if len(set(labels)) != len(labels):
        raise UserError("a checkpoint is named twice")
    for c in labels:
        if not Path(c).exists():
            raise UserError(f"checkpoint not found: {c}")
    prompts = read_prompts(prompts_path)
    out = Path(out)
    done = {(r["checkpoint"], r["prompt"]) for r in read_ratings(out)}
    items = [(c, i) for c in labels for i in range(len(prompts))]
    random.Random(seed).shuffle(items)
    todo = [(c, i) for c, i in items if (c, prompts[i]) not in done]
    if not todo:
        print(f"every sample is rated already ({len(items)} in {out}); see them with --summary {out}", file=stdout)
        return 0
    print(f"{len(todo)} samples to rate ({len(items) - len(todo)} rated before). For each, type three ratings "
          f"from 1 (bad) to 5 (good): {', '.join(CRITERIA)}, e.g. '4 3 5'; 's' skips, 'q' stops.", file=stdout)
    sampler = sampler or Samples(params, seed, device)
    make_dir(out.parent)
    new_file = not out.exists() or out.stat().st_size == 0
    given = 0
    with open(out, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
            f.flush()
        for n, (checkpoint, i) in enumerate(todo, 1):
            sample = sampler(checkpoint, prompts[i], i)
            print(f"\n--- sample {n} of {len(todo)} ---\nprompt: {prompts[i]}\nsample: {sample}", file=stdout)
            while True:
                print(f"{' '.join(CRITERIA)} (1-5 each; s skip, q quit)> ", end="", file=stdout, flush=True)
                line = stdin.readline()
                if not line or line.strip().lower() == "q":
                    print(f"\nstopped; {given} ratings saved to {out}. Run the same command to go on.", file=stdout)
                    return given
                if line.strip().lower() == "s":
                    break
                scores = parse_rating(line)
                if scores is None:
                    print("three whole numbers from 1 to 5, please, e.g. '4 3 5'", file=stdout)
                    continue
                writer.writerow({"checkpoint": checkpoint, "prompt": prompts[i], "sample": sample,
                                 **dict(zip(CRITERIA, scores)), "rated_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
                f.flush()  # a session that dies keeps every rating given before
                given += 1
                break
    print(f"\ndone; {given} ratings saved to {out}. Summarise with: scratchlm rate --summary {out}", file=stdout)
    return given


def summarize(path: Path) -> list[dict]:
    """Per checkpoint (in order of first appearance): count, and mean and sample standard deviation of each
    criterion and of their average ("overall"); the deviation is NaN with a single rating."""
    rows = read_ratings(path)
    if not rows:
        raise UserError(f"no ratings in {path}")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["checkpoint"], []).append(r)
    out = []
    for checkpoint, rs in by.items():
        entry: dict = {"checkpoint": checkpoint, "n": len(rs)}
        values = {c: [int(r[c]) for r in rs] for c in CRITERIA}
        values["overall"] = [sum(int(r[c]) for c in CRITERIA) / len(CRITERIA) for r in rs]
        for c, v in values.items():
            entry[c] = statistics.fmean(v)
            entry[f"{c}_std"] = statistics.stdev(v) if len(v) > 1 else math.nan
        out.append(entry)
    return out


def format_summary(summary: list[dict]) -> str:
    width = max(10, *(len(s["checkpoint"]) for s in summary))
    cols = (*CRITERIA, "overall")
    lines = [f"{'checkpoint':<{width}}  {'n':>4}  " + "  ".join(f"{c:>13}" for c in cols)]
    for s in summary:
        cells = [f"{s[c]:.2f} ± {s[c + '_std']:.2f}" if not math.isnan(s[c + "_std"]) else f"{s[c]:.2f}" for c in cols]
        lines.append(f"{s['checkpoint']:<{width}}  {s['n']:>4}  " + "  ".join(f"{c:>13}" for c in cells))
    lines.append("(mean ± sample standard deviation of the 1-5 ratings; overall: the mean of the three per sample)")
    return "\n".join(lines)
