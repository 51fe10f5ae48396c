"""The speedrun records log: the Welch t-test written out by hand in bench/records.py against scipy's,
the rule's threshold, `bench/speedrun.py --seeds/--steps/--compare/--json` end to end on a tiny model,
entries written from its JSON lines, and bad input turned into one line and exit code 2."""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINIER
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Hand-made samples: equal and unequal sizes, variances a hundred times apart, a difference either way.
SAMPLES = [
    ([1.95, 1.97, 1.96], [2.00, 2.02, 2.01]),
    ([1.90, 1.99, 1.93, 1.97, 1.94], [1.98, 1.985, 1.99]),
    ([2.011, 2.012], [1.95, 2.05, 2.00, 1.99, 2.02, 2.03]),
    ([3.0, 3.5, 2.5, 4.0], [3.1, 3.2]),
    ([1.0, 1.0, 1.0, 1.1], [0.9, 1.3, 0.7]),
]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """bench/records.py and bench/speedrun.py as modules; speedrun imports its neighbours by name, so
    bench/ is on the path (at the end, where its data.py and model.py shadow nothing) while it loads."""
    sys.path.append(str(BENCH))
    try:
        yield load("records"), load("speedrun")
    finally:
        sys.path.remove(str(BENCH))
        for name in ("records", "gpu_check"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("a,b", SAMPLES)
def test_welch_matches_scipy(bench, a, b):
    records, _ = bench
    t, df = records.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert df == pytest.approx(ref.df, rel=1e-12)
    assert records.p_lower(t, df) == pytest.approx(ref.pvalue, rel=1e-9)


def test_welch_needs_a_spread(bench):
    records, _ = bench
    with pytest.raises(ValueError):
        records.welch([2.0], [2.1, 2.2])
    with pytest.raises(ValueError):
        records.welch([2.0, 2.0], [2.1, 2.1])


def test_the_rule_at_its_threshold(bench):
    records, _ = bench
    assert not records.is_record(0.05, 3)                   # p must be strictly below alpha
    assert records.is_record(0.049999, 3)
    assert not records.is_record(0.001, 2)                  # and from 3 runs or more
    assert not records.is_record(None, 5)                   # no p-value, no record
    assert records.is_record(0.009, 5, alpha=0.01) and not records.is_record(0.01, 5, alpha=0.01)
    # A sample whose p lands on either side of 0.05: the verdict follows p, as scipy computes it.
    a, b = [1.95, 1.99, 1.97], [2.00, 2.02, 2.01]
    p = stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue
    c = records.compare(a, b, alpha=p * 1.001)
    assert c["record"] and c["verdict"].startswith("lower")
    c = records.compare(a, b, alpha=p)
    assert not c["record"] and c["verdict"].startswith("not shown lower")


def test_no_scipy_is_said(bench, monkeypatch):
    records, _ = bench
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    c = records.compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    assert c["p"] is None and not c["record"] and "scipy is not installed" in c["verdict"]


# ----------------------------------------------------------------------------- entries
def fake_run(run: str, mode: str, budget: float, values: list[float], lr: float = 3e-3,
             cpu: str = "Test CPU") -> list[dict]:
    """The JSON lines one bench/speedrun.py invocation appends, with chosen results."""
    rows = [{"kind": "seed", "run": run, "seed": 1337 + i, "mode": mode, "budget": budget, "val_bpb": v,
             "val_loss": v * 1.1, "steps": 1000 + i, "tokens": 4096 * (1000 + i), "train_seconds": 300.0}
            for i, v in enumerate(values)]
    return rows + [{"kind": "summary", "run": run, "mode": mode, "budget": budget, "date": "2026-12-02T10:00:00",
                    "commit": "abc1234", "config": {"model": {"d_model": 128}, "train": {"lr": lr, "seed": 1337},
                                                    "data": {"tokenizer": f"/tmp/{run}/tokenizer"}},
                    "machine": {"cpu": cpu, "cpu_flags": ["avx512_bf16"], "threads": 2, "torch": "2.x"},
                    "matmul_gflops": {"start": {"fp32": 51.5, "bf16": 101.0}, "end": {"fp32": 49.3, "bf16": 98.0}}}]


def write_results(path: Path, *runs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for run in runs for row in run))
    return path


def write_entry(records, capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["records.py", *map(str, args)])
    code = records.main()
    out, err = capsys.readouterr()
    return code, out, err


def test_entries_record_the_rule(bench, tmp_path, capsys, monkeypatch):
    records, _ = bench
    log = tmp_path / "records"
    log.mkdir()
    base = write_results(tmp_path / "base.jsonl", fake_run("b1", "time", 5.0, [2.00, 2.02, 2.01]),
                         fake_run("b2", "steps", 1000, [2.05, 2.06, 2.04]))
    code, out, _ = write_entry(records, capsys, monkeypatch, base, log / "0000-demo.md", "--note", "The demo recipe.")
    assert code == 0 and "baseline" in out
    entry = (log / "0000-demo.md").read_text()
    for field in ("The demo recipe.", "date: 2026-12-02T10:00:00", "commit: abc1234", "avx512_bf16",
                  "| 1338 | 2.0200 | 1001 | 4,100,096 | 300.0 |", "Mean **2.0100**", "5 minutes", "1000 steps",
                  "fp32 51.5, bf16 101.0", "fp32 49.3, bf16 98.0", "```jsonl"):
        assert field in entry, field
    runs = records.load_runs(log / "0000-demo.md")
    assert [records.bpb(r) for r in runs] == [[2.00, 2.02, 2.01], [2.05, 2.06, 2.04]]

    # A change that wins at equal time: an entry, set against 0000 (the highest number before it).
    better = write_results(tmp_path / "better.jsonl", fake_run("c1", "time", 5.0, [1.95, 1.97, 1.96], lr=4e-3,
                                                               cpu="Other CPU"),
                           fake_run("c2", "steps", 1000, [2.03, 2.04, 2.05], lr=4e-3))
    code, out, _ = write_entry(records, capsys, monkeypatch, better, log / "0001-lr.md")
    assert code == 0 and "a record" in out
    entry = (log / "0001-lr.md").read_text()
    time_ref = stats.ttest_ind([1.95, 1.97, 1.96], [2.00, 2.02, 2.01], equal_var=False, alternative="less")
    steps_ref = stats.ttest_ind([2.03, 2.04, 2.05], [2.05, 2.06, 2.04], equal_var=False, alternative="less")
    assert "    --set train.lr=0.004\n" in entry
    assert "tokenizer" not in entry.split("## Results")[0]      # a per-run path, not configuration
    assert f"| 5 minutes | 1.9600 | 2.0100 | {time_ref.statistic:.3f} | {time_ref.df:.2f} | {time_ref.pvalue:.4g} |" \
        in entry
    assert f"| 1000 steps | 2.0400 | 2.0500 | {steps_ref.statistic:.3f} | {steps_ref.df:.2f} | {steps_ref.pvalue:.4g} |" \
        in entry
    assert "previous record: [0000-demo.md](0000-demo.md)" in entry
    assert "another CPU than the previous record's** (Test CPU)" in entry
    assert "another CPU" not in (log / "0000-demo.md").read_text()

    # The same numbers again do not beat 0001: nothing is written, exit 1.
    same = write_results(tmp_path / "same.jsonl", fake_run("d1", "time", 5.0, [1.96, 1.95, 1.97]),
                         fake_run("d2", "steps", 1000, [2.03, 2.04, 2.05]))
    code, _, err = write_entry(records, capsys, monkeypatch, same, log / "0002-same.md")
    assert code == 1 and "not a record" in err and not (log / "0002-same.md").exists()

    # Fewer than 3 runs at equal time, or a different time budget: a user's mistake, one line.
    two = write_results(tmp_path / "two.jsonl", fake_run("e1", "time", 5.0, [1.5, 1.6]),
                        fake_run("e2", "steps", 1000, [2.0, 2.1]))
    code, _, err = write_entry(records, capsys, monkeypatch, two, log / "0002-two.md")
    assert code == 2 and err.count("\n") == 1 and "3 or more" in err
    other = write_results(tmp_path / "other.jsonl", fake_run("f1", "time", 4.0, [1.5, 1.6, 1.55]),
                          fake_run("f2", "steps", 1000, [2.0, 2.1]))
    code, _, err = write_entry(records, capsys, monkeypatch, other, log / "0002-other.md")
    assert code == 2 and err.count("\n") == 1 and "same budget" in err


# ----------------------------------------------------------------------------- speedrun.py
def tiny(play_text: Path) -> list[str]:
    sets = [f"data.dataset={play_text}", "train.precision=fp32", "train.device=cpu", *TINIER]
    return [arg for s in sets for arg in ("--set", s)]


def speedrun_main(speedrun, capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["speedrun.py", *map(str, args)])
    code = speedrun.main()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_seeds_steps_json_compare_and_an_entry(bench, tmp_path, play_text, capsys, monkeypatch, single_thread):
    records, speedrun = bench
    cache = tmp_path / "cache"
    env = dict(os.environ, SCRATCHLM_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    results = tmp_path / "runs.jsonl"
    done = subprocess.run([sys.executable, str(BENCH / "speedrun.py"), "--seeds", "2", "--steps", "3",
                           "--json", str(results), *tiny(play_text)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "flags" in done.stdout and "matmul GFLOP/s at the start" in done.stdout \
        and "matmul GFLOP/s at the end" in done.stdout
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["seed", "seed", "summary"]
    seeds, summary = lines[:2], lines[2]
    assert [s["seed"] for s in seeds] == [1337, 1338] and all(s["steps"] == 3 for s in seeds)
    values = [s["val_bpb"] for s in seeds]
    assert values[0] != values[1]  # the seeds differ, not one run twice
    assert summary["val_bpb_mean"] == pytest.approx(statistics.fmean(values))
    assert summary["val_bpb_sd"] == pytest.approx(statistics.stdev(values))
    assert summary["mode"] == "steps" and summary["budget"] == 3 and summary["n"] == 2
    assert set(summary["matmul_gflops"]) == {"start", "end"} and summary["matmul_gflops"]["end"]["bf16"] > 0
    assert f"{summary['val_bpb_mean']:.4f}" in done.stdout and f"{summary['val_bpb_sd']:.4f}" in done.stdout

    # In this process from here: the same steps with another learning rate, tested against those runs.
    monkeypatch.setenv("SCRATCHLM_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = speedrun_main(speedrun, capsys, monkeypatch, "--seeds", "2", "--steps", "3", "--json",
                                 tmp_path / "other.jsonl", "--compare", results, *tiny(play_text),
                                 "--set", "train.lr=2e-2")
    assert code == 0
    other = [json.loads(line) for line in (tmp_path / "other.jsonl").read_text().splitlines()]
    ref = stats.ttest_ind([r["val_bpb"] for r in other[:2]], values, equal_var=False, alternative="less")
    c = other[2]["compare"]
    assert c["t"] == pytest.approx(ref.statistic) and c["df"] == pytest.approx(ref.df)
    assert c["p"] == pytest.approx(ref.pvalue)
    assert f"Welch t {ref.statistic:.3f}, df {ref.df:.2f}" in out

    # Three seeds at equal time, then the first entry from the file.
    code, _, _ = speedrun_main(speedrun, capsys, monkeypatch, "--seeds", "3", "--minutes", "0.01",
                               "--json", results, *tiny(play_text))
    assert code == 0
    entry = tmp_path / "records" / "0000-tiny.md"
    entry.parent.mkdir()
    code, _, _ = write_entry(records, capsys, monkeypatch, results, entry)
    assert code == 0
    text = entry.read_text()
    timed = [json.loads(line) for line in results.read_text().splitlines()][3:6]
    assert "0.01 minutes" in text and "3 steps" in text and "Matmul GFLOP/s" in text
    for row in [*seeds, *timed]:
        assert f"| {row['seed']} | {row['val_bpb']:.4f} | {row['steps']} |" in text
    assert [records.bpb(r) for r in records.load_runs(entry)] == [[r["val_bpb"] for r in timed], values]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content,args,says", [
    (None, ["--seeds", "0"], "--seeds 0"),
    (None, ["--seeds", "3", "--compare", "{missing}"], "no such file"),
    ("not json\n", ["--seeds", "3", "--compare", "{file}"], "not valid JSON"),
    ('{"val_bpb": 1.9}\n', ["--seeds", "3", "--compare", "{file}"], "not a line of bench/speedrun.py --json"),
    (None, ["--seeds", "1", "--compare", "{missing}"], "--seeds 2 or more"),
    (None, ["--steps", "0"], "--steps 0"),
    (None, ["--steps", "10", "--minutes", "5"], "give one budget"),
    (None, ["--minutes", "0"], "--minutes 0"),
    (None, ["--alpha", "1.5"], "--alpha 1.5"),
    (None, ["--set", "train.minutes=3"], "--minutes or --steps"),
    ("a file left by an earlier run\n", ["--out", "{folder}"], "not empty"),
])
def test_speedrun_bad_input_is_one_line(bench, tmp_path, capsys, monkeypatch, content, args, says):
    _, speedrun = bench
    file = tmp_path / "results.jsonl"
    if content is not None:
        file.write_text(content)
    args = [a.format(file=file, missing=tmp_path / "nope.md", folder=tmp_path) for a in args]
    code, out, err = speedrun_main(speedrun, capsys, monkeypatch, *args)
    assert code == 2 and err.count("\n") == 1 and says in err and err.startswith("error: "), err
    assert out == ""  # refused before measuring or training anything


@pytest.mark.parametrize("content,says", [
    ("not json\n", "results.jsonl:1: not valid JSON"),
    ("[1, 2]\n", "results.jsonl:1: not a line"),
    ('{"kind": "seed", "run": "a", "seed": 1, "mode": "time", "budget": 5, "val_bpb": "1.9", "steps": 1, '
     '"tokens": 1, "train_seconds": 1}\n', "results.jsonl:1: not a line"),
    ('{"kind": "seed", "run": "a", "seed": 1, "mode": "minutes", "budget": 5, "val_bpb": 1.9, "steps": 1, '
     '"tokens": 1, "train_seconds": 1}\n', "results.jsonl:1: not a line"),
    ("\xff\n", "not UTF-8"),
    (None, "no such file"),
])
def test_records_bad_input_is_one_line(bench, tmp_path, capsys, monkeypatch, content, says):
    records, _ = bench
    results = tmp_path / "results.jsonl"
    if content is not None:
        results.write_bytes(content.encode("latin-1"))
    code, _, err = write_entry(records, capsys, monkeypatch, results, tmp_path / "0000-x.md")
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "0000-x.md").exists()


def test_an_entry_without_results_is_refused(bench, tmp_path, capsys, monkeypatch):
    records, _ = bench
    previous = tmp_path / "0000-hand.md"
    previous.write_text("# 0000-hand\n\nwritten by hand, no results block\n")
    results = write_results(tmp_path / "r.jsonl", fake_run("a", "time", 5.0, [1.0, 1.1, 1.2]),
                            fake_run("b", "steps", 10, [1.0, 1.1]))
    code, _, err = write_entry(records, capsys, monkeypatch, results, tmp_path / "0001-x.md")
    assert code == 2 and err.count("\n") == 1 and "no ```jsonl block" in err
    code, _, err = write_entry(records, capsys, monkeypatch, results, tmp_path / "first.md")
    assert code == 2 and "NNNN-name.md" in err
