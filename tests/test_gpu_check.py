"""bench/gpu_check.py, the GPU proof, rehearsed on CPU: the whole sequence at toy sizes (so that nothing in
it is first tried on a GPU), and the runner's promise that one check failing, hanging or being skipped
costs that check only."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
NAMES = ["pytest-gpu", "flash-attention", "gpt2-124m", "qt-1b", "generate", "shakespeare-gpu"]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow
def test_tiny_sequence_on_cpu(tmp_path, play_text):
    env = dict(os.environ, SCRATCHLM_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "check"
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--data", str(play_text),
                             "--out", "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in report["checks"]}
    assert list(rows) == NAMES
    assert report["machine"]["torch"] and "cpu_flags" in report["machine"]
    triton = importlib.util.find_spec("triton") is not None
    for name, row in rows.items():
        expected = "skipped" if name == "flash-attention" and not triton else "ok"
        assert row["status"] == expected, (name, row)
        assert row["seconds"] < row["limit_s"]

    # pytest -m gpu selects the CUDA tests, which all skip here
    counts = rows["pytest-gpu"]["numbers"]
    assert counts["skipped"] >= 1 and counts["passed"] == counts["failed"] == counts["errors"] == 0

    if triton:  # the interpreter's float32 kernel against float64, in both variants, forward and backward
        kernel = rows["flash-attention"]["numbers"]
        assert set(kernel) == {"causal", "causal GQA ALiBi"}
        gqa = kernel["causal GQA ALiBi"][0]
        assert gqa["alibi"] and gqa["H_kv"] < gqa["H"] and gqa["dtype"] == "float32"
        for variant in kernel.values():
            for part in ("out", "dq", "dk", "dv"):
                assert variant[0][f"err_ours_{part}"] < 1e-5
        assert rows["flash-attention"]["met"] is True  # errors judged; no length long enough to judge time

    gpt2 = rows["gpt2-124m"]["numbers"]
    assert gpt2["loss_last"] < gpt2["loss_first"] and gpt2["tokens_per_s"] > 0 and 0 < gpt2["mfu"] < 1
    assert "measured" in gpt2["peak"] and gpt2["steps"] == 8
    # the MFU is the run's own tokens/s over the FLOPs counted here; the run logs its own against the same peak kind
    assert gpt2["mfu"] == pytest.approx(gpt2["flops_per_token"] * gpt2["tokens_per_s"] / gpt2["peak_flops"])

    qt = rows["qt-1b"]["numbers"]
    assert qt["activation_checkpointing"] is True and qt["precision"] == "bf16"  # as the recipe says
    assert qt["peak_bytes"] > 0 and qt["step_s"] > 0 and rows["qt-1b"]["met"] is True

    if rows["generate"]["status"] == "ok":
        decode = rows["generate"]["numbers"]["random 7m"]
        assert decode["batch 1"]["ours"] > 0 and decode["batch 2"]["transformers"] > 0

    bpb = rows["shakespeare-gpu"]["numbers"]["val_bpb"]
    assert math.isfinite(bpb) and 0 < bpb < 8  # below a byte's 8 bits: it learnt something

    # the training checks trained on --data, not on the recipes' own download
    datasets = list((tmp_path / "cache" / "datasets").iterdir())
    assert datasets and all(d.name.startswith("local-play") for d in datasets)
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | " in table for name in NAMES) and table in result.stdout
    assert all((out / log).is_file() for row in rows.values() for log in row["logs"])
    assert time.monotonic() - start < 300


def test_one_failing_or_hanging_check_costs_that_check_only(gc, tmp_path, monkeypatch):
    """A check that exits non-zero gets its last stderr lines in the table; one that hangs is killed at its
    limit with what it started; one that cannot run says why; the checks after them still run."""
    marker = tmp_path / "grandchild.pid"

    def failing(ctx):
        ctx.run([sys.executable, "-c", "import sys; print('step 1'); print('CUDA error: out of memory', file=sys.stderr);"
                 " sys.exit(3)"], "failing")

    def hanging(ctx):
        # the child starts a grandchild that would outlive it: the whole group must go
        code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
                f" open({str(marker)!r}, 'w').write(str(p.pid)); print('waiting', flush=True); time.sleep(60)")
        ctx.run([sys.executable, "-c", code], "hanging")

    def skipped(ctx):
        raise gc.Skip("transformers is not installed")

    def fine(ctx):
        _, out, _ = ctx.run([sys.executable, "-c", "print(6 * 7)"], "fine")
        return gc.Outcome(f"answer {out.strip()}", {"answer": int(out)}, "42", int(out) == 42)

    monkeypatch.setattr(gc, "CHECKS", [gc.Check("failing", 30, 30, failing), gc.Check("hanging", 3, 3, hanging),
                                       gc.Check("skipped", 30, 30, skipped), gc.Check("fine", 30, 30, fine)])
    start = time.monotonic()
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "out")]) == 0
    assert time.monotonic() - start < 30
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in report["checks"]}
    assert [rows[n]["status"] for n in ("failing", "hanging", "skipped", "fine")] == ["failed", "timeout", "skipped", "ok"]
    assert "exit 3" in rows["failing"]["error"] and "CUDA error: out of memory" in rows["failing"]["error"]
    assert rows["failing"]["stderr_tail"] == ["CUDA error: out of memory"]
    assert 3 <= rows["hanging"]["seconds"] < 10 and "waiting" in rows["hanging"]["error"]
    grandchild = int(marker.read_text())
    for _ in range(50):  # SIGKILL is delivered at once, but the process table may take a moment to show it
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert rows["skipped"]["error"] == "transformers is not installed"
    assert rows["fine"]["numbers"] == {"answer": 42} and rows["fine"]["met"] is True
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| failing | failed |" in table and "CUDA error: out of memory" in table
    assert "--- stdout\nstep 1\n" in (tmp_path / "out" / "logs" / "failing.log").read_text()


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has ended; only its parent's wait is missing


def test_budget_stops_starting_checks(gc, tmp_path, monkeypatch):
    ran = []

    def slow(ctx):
        ran.append(1)
        ctx.run([sys.executable, "-c", "import time; time.sleep(60)"], "slow")

    monkeypatch.setattr(gc, "CHECKS", [gc.Check("first", 60, 60, slow), gc.Check("second", 60, 60, slow)])
    gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget", "12"])
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert [r["status"] for r in rows] == ["timeout", "skipped"] and ran == [1]
    assert rows[0]["seconds"] < 15 and "budget" in rows[1]["error"]


def test_flops_per_token_matches_gpt2_small(gc):
    """GPT-2 small's published 124,439,808 parameters (OpenAI's checkpoint, 50,257 tokens), less the 1024 x 768
    position table and the 121,344 norm gains and biases, which no matrix product uses, gives 6 FLOPs per
    weight; attention adds 12 * layers * d_model * T (PaLM, appendix B)."""
    from scratchlm.config import build_config

    cfg = build_config({"model": {"preset": "gpt2-124m"}}).model
    vectors = 12 * (2 * 768 + 2 * 768 + 4 * 768 + 3072 + 768) + 2 * 768  # per block: 2 norms, biases; final norm
    weights = 124_439_808 - 1024 * 768 - vectors
    assert gc.train_flops_per_token(cfg) == 6 * weights + 12 * 12 * 768 * 1024


def test_judges(gc):
    # a loss that did not fall fails gpt2-124m even at a high MFU; the first (compiling) window is left out
    rows = [{"step": 5, "loss": 9.0, "tokens_per_s": 10.0}, {"step": 10, "loss": 9.1, "tokens_per_s": 500.0},
            {"step": 15, "loss": 9.2, "tokens_per_s": 520.0}, {"step": 15, "final": True, "val_bpb": 3.0}]
    outcome = gc.judge_gpt2(rows, 1000.0, ("test peak", 1e6))
    assert outcome.numbers["tokens_per_s"] == 510.0 and outcome.numbers["mfu"] == pytest.approx(0.51)
    assert outcome.met is False and outcome.numbers["val_bpb"] == 3.0

    def row(T, ours_ms, sdpa_ms, err_ours, err_sdpa):
        errs = {f"err_{side}_{p}": e for side, e in (("ours", err_ours), ("sdpa", err_sdpa)) for p in ("out", "dq", "dk", "dv")}
        return {"T": T, "fwd_ms_ours": ours_ms, "bwd_ms_ours": 2 * ours_ms, "fwd_ms_sdpa": sdpa_ms,
                "bwd_ms_sdpa": 2 * sdpa_ms, **errs}

    fast = {"causal": [row(1024, 5.0, 1.0, 0.01, 0.01), row(4096, 1.1, 1.0, 0.01, 0.01)]}
    assert gc.judge_attention(fast).met is True  # slow at 1k does not count; within 1.2x from 4k does
    assert gc.judge_attention({"causal": [row(8192, 1.3, 1.0, 0.01, 0.01)]}).met is False
    assert gc.judge_attention({"causal": [row(8192, 1.0, 1.0, 0.05, 0.01)]}).met is False  # 5x SDPA's error

    table = ("| model | measure | scratchlm | transformers | scratchlm / transformers |\n|---|---|---|---|---|\n"
             "| random 7m | decode tokens/s, batch 1 (tok/s) | 1,250.5 | 500.2 | 2.50x |\n"
             "| random 7m | time to first token, batch 1 (ms) | 9.0 | 9.2 | 1.03x |\n"
             "SmolLM2-135M-Instruct skipped: SmolLM2-135M-Instruct.Q4_1.gguf not found\n")
    numbers = gc.judge_generate(table).numbers
    assert numbers["random 7m"] == {"batch 1": {"ours": 1250.5, "transformers": 500.2, "ratio": 1250.5 / 500.2}}
    assert numbers["skipped"][0].startswith("SmolLM2")


def test_user_mistakes_get_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)

    result = run("--device", "cpu", "--tiny", "--data", str(tmp_path / "missing.txt"))
    assert result.returncode == 2 and "--data" in result.stderr and "Traceback" not in result.stderr
    result = run("--device", "cpu")  # GPU sizes on a CPU would take hours
    assert result.returncode == 2 and "--tiny" in result.stderr.splitlines()[-1]
