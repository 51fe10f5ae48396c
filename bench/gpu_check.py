"""Every GPU check of scratchlm in one command: each under its own time limit, the results in gpu_check.json
and gpu_check.md, the table printed at the end.

    python bench/gpu_check.py --data shakespeare.txt --out runs/gpu-check     # one CUDA GPU, at most 8 minutes
    python bench/gpu_check.py --device cpu --tiny --data corpus.txt --out /tmp/x   # the same sequence on CPU

The checks, in order (`--only NAME ...` runs some of them):
- pytest-gpu: the suite's CUDA-only tests (`pytest -m gpu`), passed/failed/skipped counts.
- flash-attention: scratchlm's Triton FlashAttention-2 kernel against PyTorch SDPA and against float64
  attention, forward and backward, causal, bf16, T = 1k-8k: once with as many K/V heads as query heads
  (the peer is SDPA's flash backend) and once with GQA and ALiBi (the peer takes a float mask), through
  `bench/attention.py --reference`.
- gpt2-124m: recipes/gpt2-124m.toml for 90 seconds with torch.compile: tokens/s, MFU against the GPU's
  dense bf16 peak, and whether the loss fell.
- qt-1b: one training step of recipes/qt-1b.toml at its micro-batch, with its activation checkpointing:
  peak memory (it must fit the seed's 32 GB GPU) and step time.
- generate: `bench/generate.py --device cuda --dtype bfloat16`, decode tokens/s against transformers.
- shakespeare-gpu: recipes/shakespeare-gpu.toml for 2 minutes: validation bits per byte.

Each check runs in a child process (the kernel, training and decoding through the scripts and the
command line a user would run; the qt-1b step through this script's `--worker qt-1b`), so a crash, an
out-of-memory or a hang costs that check only: it is killed at its limit and the next one starts. The
whole sequence also stops starting checks once `--budget` seconds have passed. gpu_check.json and the
table are rewritten after every check, so a run cut short keeps what it measured.

Training reads `--data` (a text file or a folder, as `data.dataset` takes it) in place of the recipes'
own Shakespeare download, for machines without the internet. With `--tiny` every check runs at toy sizes
(a few steps of a narrow model, T = 32 through Triton's interpreter): the code path is the GPU run's, the
numbers mean nothing, and the targets, judged all the same, are not expected to be met.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's scratchlm, installed or not

import torch  # noqa: E402

GiB = 1024**3
QT1B_LIMIT = 32 * GiB             # the seed's GPU
MFU_TARGET = 0.45                 # nanochat reports 41% for its d12, litgpt 52% at 1B
KERNEL_TIME_TARGET = 1.2          # forward + backward time over SDPA's, at the longest lengths
KERNEL_TIMED_FROM = 4096
# Dense bf16 tensor-core peaks, FLOP/s, by a substring of the device name (the more specific first).
KNOWN_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

# --tiny: the same recipes, narrowed until a few steps take seconds on a CPU.
TINY_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.context=32", "model.d_ff=128"]
# (Micro-batches of 16: the final evaluation reads the whole validation split in batches of that size.)
TINY_TRAIN = TINY_MODEL + ["data.vocab_size=512", "train.device=cpu", "train.micro_batch=16", "train.batch_tokens=0",
                           "train.max_steps=8", "train.minutes=0", "train.warmup_steps=2", "train.lr=3e-3",
                           "train.log_every=1", "train.compile=false"]
TINY_QT1B = TINY_MODEL + ["model.n_kv_heads=2", "model.vocab_size=512", "train.micro_batch=4"]


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Failed(Exception):
    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


class TimedOut(Exception):
    def __init__(self, tail: list[str]):
        super().__init__("time limit reached")
        self.tail = tail


@dataclass
class Outcome:
    summary: str                 # the key numbers, for the table
    numbers: dict
    target: str = ""
    met: bool | None = None


@dataclass
class Context:
    device: str
    tiny: bool
    data: str | None
    out: Path
    deadline: float = 0.0        # time.monotonic() at which the running check is killed
    peak: tuple[str, float] | None = None
    logs: list[str] = field(default_factory=list)

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        return env

    def run(self, cmd: list[str], log: str, check: bool = True) -> tuple[int, str, str]:
        """Run `cmd` from the repository root until it ends or the check's deadline; its output goes to
        logs/`log`.log. A non-zero exit raises Failed (unless `check` is off), the deadline TimedOut."""
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise TimedOut([])
        # Its own process group, so that a timeout also ends what it started (compile workers, servers).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=left)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        path = self.out / "logs" / f"{log}.log"
        write_text(path, f"$ {shlex.join(cmd)}\n# exit {'killed at the time limit' if timed_out else proc.returncode}"
                         f"\n\n--- stdout\n{out}\n--- stderr\n{err}")
        self.logs.append(str(path.relative_to(self.out)))
        if timed_out:
            raise TimedOut(tail_lines(err or out))
        if check and proc.returncode:
            tail = tail_lines(err or out)
            raise Failed(f"exit {proc.returncode}: {' / '.join(tail[-3:]) or 'no output'}", tail)
        return proc.returncode, out, err

    def peak_flops(self) -> tuple[str, float]:
        """The MFU denominator, looked up or measured once a run."""
        if self.peak is None:
            self.peak = dense_peak(self.device)
        return self.peak

    def worker(self, name: str) -> dict:
        """Run `--worker name` in a child and return the JSON object it prints last."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", self.device]
        _, out, _ = self.run(cmd + (["--tiny"] if self.tiny else []), name)
        return json.loads(out.strip().splitlines()[-1])

    def pretrain(self, recipe: str, name: str, sets: list[str], tiny: list[str]) -> list[dict]:
        """`scratchlm pretrain` on a recipe into runs/`name`; the rows of its metrics.jsonl."""
        run_dir = self.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: pretrain refuses to overwrite one
        sets = list(sets) + ([f"data.dataset={json.dumps(self.data)}"] if self.data else [])  # a TOML string
        sets += tiny if self.tiny else [f"train.device={self.device}"]
        cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--config", str(ROOT / "recipes" / recipe),
               "--out", str(run_dir)] + [f"--set={s}" for s in sets]
        self.run(cmd, name)
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise Failed(f"{metrics} was not written", [])
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the checks
def check_pytest(ctx: Context) -> Outcome:
    report = ctx.out / "pytest-gpu.xml"
    if report.exists():
        report.unlink()  # a report left by an earlier run must not stand in for this one
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={report}", str(ROOT / "tests")]
    code, out, err = ctx.run(cmd, "pytest-gpu", check=False)
    if not report.is_file():
        tail = tail_lines(err or out)
        raise Failed(f"pytest wrote no report (exit {code})", tail)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for suite in ET.parse(report).getroot().iter("testsuite"):
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        counts["passed"] += int(suite.get("tests", 0)) - sum(int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        failing += [case.get("name") for case in suite.iter("testcase")
                    if case.find("failure") is not None or case.find("error") is not None]
    if code not in (0, 1):  # 1: some failed (counted above); anything else: pytest itself did not run
        raise Failed(f"pytest exit {code}: {(tail_lines(out) or ['no output'])[-1]}", tail_lines(err or out))
    selected = sum(counts.values())
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no test selected"
    if failing:
        summary += f" ({', '.join(failing[:4])}{', ...' if len(failing) > 4 else ''})"
    met = selected > 0 and counts["passed"] == selected
    return Outcome(summary, counts | {"failing": failing}, "every CUDA test passes", met)


def check_attention(ctx: Context) -> Outcome:
    rows_file = ctx.out / "attention.jsonl"
    if rows_file.exists():
        rows_file.unlink()  # bench/attention.py appends
    if ctx.tiny:
        sizes = ["--seqlens", "32", "--head-dims", "16", "--tokens", "32", "--width", "64", "--repeats", "1",
                 "--warmup", "0"]
        variants = {"causal": [], "causal GQA ALiBi": ["--kv-heads", "2", "--alibi"]}
    else:
        sizes = ["--seqlens", "1024,2048,4096,8192", "--head-dims", "64", "--repeats", "10"]
        variants = {"causal": [], "causal GQA ALiBi": ["--kv-heads", "8", "--alibi"]}
    results: dict[str, list[dict]] = {}
    for name, extra in variants.items():
        before = rows_file.read_text().splitlines() if rows_file.exists() else []
        cmd = [sys.executable, str(ROOT / "bench" / "attention.py"), "--device", ctx.device, "--reference",
               "--json", str(rows_file)] + sizes + extra
        _, out, _ = ctx.run(cmd, f"flash-attention-{len(results) + 1}")
        lines = rows_file.read_text().splitlines() if rows_file.exists() else []
        if len(lines) == len(before):  # the script said why it did nothing
            raise Skip((out.strip().splitlines() or ["bench/attention.py measured nothing"])[-1])
        results[name] = [json.loads(line) for line in lines[len(before):]]
    return judge_attention(results)


def judge_attention(results: dict[str, list[dict]]) -> Outcome:
    """Errors within bf16 reach: ours against float64 at most twice SDPA's own, plus 1e-3 (the bound of the
    suite's GPU test); time: forward + backward within 1.2x of SDPA from T = 4096 up."""
    errors_ok, time_ok, parts, numbers = True, True, [], {}
    for name, rows in results.items():
        ratios, worst = [], (0.0, 0.0)
        for r in rows:
            ratio = (r["fwd_ms_ours"] + r["bwd_ms_ours"]) / (r["fwd_ms_sdpa"] + r["bwd_ms_sdpa"])
            r["fwd_bwd_ratio"] = ratio
            ratios.append(f"{ratio:.2f}")
            for part in ("out", "dq", "dk", "dv"):
                ours, peer = r[f"err_ours_{part}"], r[f"err_sdpa_{part}"]
                errors_ok &= ours <= 2 * peer + 1e-3
                worst = max(worst, (ours, peer))
            if r["T"] >= KERNEL_TIMED_FROM:
                time_ok &= ratio <= KERNEL_TIME_TARGET
        lengths = "/".join(str(r["T"]) for r in rows)
        parts.append(f"{name}: fwd+bwd time / SDPA {'/'.join(ratios)}x at T={lengths}, "
                     f"largest float64 error {worst[0]:.1e} (SDPA {worst[1]:.1e})")
        numbers[name] = rows
    target = (f"errors within 2x SDPA's (+1e-3) of float64; fwd+bwd <= {KERNEL_TIME_TARGET}x SDPA "
              f"at T >= {KERNEL_TIMED_FROM}")
    verdicts = ["errors " + ("ok" if errors_ok else "too large")]
    if any(r["T"] >= KERNEL_TIMED_FROM for rows in results.values() for r in rows):
        verdicts.append("time " + ("ok" if time_ok else "too slow"))
    else:
        time_ok = True  # no length long enough to judge (--tiny)
    return Outcome("; ".join(parts + verdicts), numbers, target, errors_ok and time_ok)


def check_gpt2(ctx: Context) -> Outcome:
    sets = ["train.compile=true", "train.max_steps=0", "train.minutes=1.5", "train.log_every=5"]
    rows = ctx.pretrain("gpt2-124m.toml", "gpt2-124m", sets, TINY_TRAIN)
    from scratchlm.config import load_config

    model_cfg = load_config(ctx.out / "runs" / "gpt2-124m" / "config.toml").model
    return judge_gpt2(rows, train_flops_per_token(model_cfg), ctx.peak_flops())


def judge_gpt2(rows: list[dict], flops_per_token: float, peak: tuple[str, float]) -> Outcome:
    train = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    if not train:
        raise Failed("metrics.jsonl holds no training rows", [])
    # The first logged window holds the compilation and the allocator's warm-up: left out where there are more.
    steady = train[1:] or train
    rate = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = flops_per_token * rate / peak[1]
    first, last = train[0]["loss"], train[-1]["loss"]
    final = next((r for r in reversed(rows) if r.get("final")), {})
    numbers = {"tokens_per_s": rate, "mfu": mfu, "peak_flops": peak[1], "peak": peak[0],
               "flops_per_token": flops_per_token, "steps": train[-1]["step"], "loss_first": first, "loss_last": last,
               "val_bpb": final.get("val_bpb")}
    logged = [r["mfu"] for r in steady if "mfu" in r]
    if logged:
        numbers["mfu_logged"] = statistics.median(logged)  # the run's own figure, against train/mfu.py's table
    summary = (f"{rate:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {peak[0]}; loss {first:.3f} -> {last:.3f} "
               f"over {train[-1]['step']} steps")
    return Outcome(summary, numbers, f"MFU >= {100 * MFU_TARGET:.0f}%, loss falls", mfu >= MFU_TARGET and last < first)


def check_qt1b(ctx: Context) -> Outcome:
    r = ctx.worker("qt-1b")
    peak = r["peak_bytes"]
    where = "GPU memory allocated" if r["device"] == "cuda" else "process RSS"
    summary = (f"peak {peak / GiB:.2f} GiB ({where}), step {r['step_s']:.2f} s; {r['params'] / 1e6:,.1f}M parameters, "
               f"micro-batch {r['micro_batch']} x {r['context']}, activation checkpointing "
               f"{'on' if r['activation_checkpointing'] else 'off'}")
    if "reserved_bytes" in r:
        summary += f"; reserved {r['reserved_bytes'] / GiB:.2f} GiB"
    return Outcome(summary, r, f"peak < {QT1B_LIMIT / GiB:.0f} GiB", peak < QT1B_LIMIT)


def check_generate(ctx: Context) -> Outcome:
    if importlib.util.find_spec("transformers") is None:
        raise Skip("transformers is not installed (pip install -e '.[hf]'): it is the peer")
    if ctx.tiny:
        cmd = ["--device", "cpu", "--models", "7m", "--rounds", "1", "--new-tokens", "8", "--prompt-tokens", "16",
               "--batch", "2", "--clients", "2", "--client-tokens", "4"]
    else:
        cmd = ["--device", "cuda", "--dtype", "bfloat16", "--rounds", "2"]
    _, out, _ = ctx.run([sys.executable, str(ROOT / "bench" / "generate.py")] + cmd, "generate")
    return judge_generate(out)


def judge_generate(out: str) -> Outcome:
    """The decode rows of bench/generate.py's table, per model."""
    numbers: dict[str, dict] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("decode tokens/s"):
            batch = re.search(r"batch (\d+)", cells[1]).group(1)
            ours, theirs = (float(c.replace(",", "")) for c in cells[2:4])
            numbers.setdefault(cells[0], {})[f"batch {batch}"] = {"ours": ours, "transformers": theirs,
                                                                  "ratio": ours / theirs}
    if not numbers:
        raise Failed("bench/generate.py printed no decode rows", tail_lines(out))
    summary = "; ".join(f"{model}: " + ", ".join(f"{b} {v['ours']:,.0f} vs {v['transformers']:,.0f} tok/s "
                                                  f"({v['ratio']:.2f}x)" for b, v in rows.items())
                        for model, rows in numbers.items())
    skipped = [line.strip() for line in out.splitlines() if " skipped:" in line]
    if skipped:
        numbers["skipped"] = skipped
        summary += f"; {skipped[0].split(':')[0]} skipped"
    return Outcome(summary, numbers, "decode tokens/s against transformers (no target set)")


def check_shakespeare(ctx: Context) -> Outcome:
    rows = ctx.pretrain("shakespeare-gpu.toml", "shakespeare-gpu", ["train.minutes=2.0"], TINY_TRAIN)
    final = next((r for r in reversed(rows) if r.get("final")), None)
    if final is None:
        raise Failed("metrics.jsonl holds no final evaluation", [])
    train = [r for r in rows if "tokens_per_s" in r]
    rate = statistics.median(r["tokens_per_s"] for r in train) if train else 0.0
    summary = f"val {final['val_bpb']:.4f} bits per byte after {final['step']} steps, {rate:,.0f} tokens/s"
    return Outcome(summary, {"val_bpb": final["val_bpb"], "val_loss": final["val_loss"], "steps": final["step"],
                             "tokens_per_s": rate}, "val bits per byte (no target set)")


@dataclass
class Check:
    name: str
    limit: float          # seconds, on a GPU
    tiny_limit: float     # seconds, with --tiny on a CPU
    run: Callable[[Context], Outcome]


# Each limit is what the check may take on one H100/H200 before it counts as hung; --budget caps the sum.
CHECKS = [
    Check("pytest-gpu", 150, 120, check_pytest),         # most of it compiling the kernels' tile candidates
    Check("flash-attention", 150, 120, check_attention),
    Check("gpt2-124m", 170, 120, check_gpt2),            # 90 s of training (compilation included), data, eval
    Check("qt-1b", 75, 60, check_qt1b),
    Check("generate", 75, 120, check_generate),
    Check("shakespeare-gpu", 180, 120, check_shakespeare),  # 120 s of training, data, evals
]


# ----------------------------------------------------------------------------- the qt-1b step (a worker)
def qt1b_step(device: str, tiny: bool) -> dict:
    """One optimizer step of the qt-1b recipe as `scratchlm pretrain` takes it: float32 weights, the recipe's
    autocast dtype, each block recomputed in backward when the recipe asks for it, fused AdamW on a GPU.
    The first step (which also allocates AdamW's moments) sets the peak; a second one is timed."""
    import contextlib
    import resource

    from torch.distributed._composable import checkpoint as recompute

    from scratchlm.config import load_config
    from scratchlm.model.transformer import Transformer

    cfg = load_config(ROOT / "recipes" / "qt-1b.toml", TINY_QT1B if tiny else [])
    tc, dev = cfg.train, torch.device(device)
    torch.manual_seed(0)
    with dev:  # built where it trains: a 1B model initialised on the CPU first would cost seconds
        model = Transformer(cfg.model)
    model.to(dev)
    if tc.activation_checkpointing:
        for block in model.blocks:
            recompute(block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  weight_decay=tc.weight_decay, fused=dev.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    ids = torch.randint(0, cfg.model.vocab_size, (tc.micro_batch, cfg.model.context + 1),
                        generator=torch.Generator().manual_seed(0)).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype) if dtype else contextlib.nullcontext():
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, second = step(), step()
    result = {"device": dev.type, "params": sum(p.numel() for p in model.parameters()),
              "micro_batch": tc.micro_batch, "context": cfg.model.context, "precision": tc.precision,
              "activation_checkpointing": tc.activation_checkpointing, "first_step_s": first, "step_s": second}
    if dev.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB
    return result


WORKERS = {"qt-1b": qt1b_step}


# ----------------------------------------------------------------------------- machine, peak, FLOPs
def train_flops_per_token(model_cfg) -> float:
    """Training FLOPs per token, counted independently of scratchlm's own MFU: 6 per weight of every matrix
    product (the blocks' matrices and the output head), plus 12 * layers * d_model * T for the attention
    scores and weighted sums (PaLM, appendix B)."""
    from scratchlm.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    matrices = sum(p.numel() for p in model.blocks.parameters() if p.dim() >= 2)
    head = model_cfg.vocab_size * model_cfg.d_model
    return 6 * (matrices + head) + 12 * model_cfg.n_layers * model_cfg.d_model * model_cfg.context


def matmul_rate(device: str, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """The best FLOP/s of an n x n by n x n product within the time given."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def dense_peak(device: str) -> tuple[str, float]:
    """(what the peak is, FLOP/s): the vendor's dense bf16 figure for a known GPU, else a measured rate."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in KNOWN_PEAKS:
            if key in name:
                return f"{key} dense bf16 peak {peak / 1e12:.0f} TFLOP/s", peak
        peak = matmul_rate("cuda", torch.bfloat16, 8192)
        return f"measured bf16 8192^3 matmul on {name}, {peak / 1e12:.0f} TFLOP/s", peak
    peak = matmul_rate("cpu", torch.float32, 1024)  # a CPU run trains in float32 (precision auto)
    return f"measured float32 1024^3 matmul on {torch.get_num_threads()} threads, {peak / 1e9:.0f} GFLOP/s", peak


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    for package in ("triton", "transformers"):
        try:
            info[package] = importlib.metadata.version(package)  # without importing it, which takes seconds
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        flags = set(re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M).group(1).split())
        info["cpu"] = model.group(1) if model else info["cpu"]
        info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    except (OSError, AttributeError):
        info["cpu_flags"] = []
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
        info["gpu_count"] = torch.cuda.device_count()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def describe_machine(info: dict) -> str:
    gpu = (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, driver {info['driver']}, CUDA {info['cuda']})"
           if "gpu" in info else "no GPU")
    return (f"{gpu}; CPU {info['cpu']}, {info['cpus']} cores, flags {' '.join(info['cpu_flags']) or 'none of note'}; "
            f"Python {info['python']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}")


# ----------------------------------------------------------------------------- results
def tail_lines(text: str, n: int = 20) -> list[str]:
    """The last n non-empty lines, progress-bar redraws (carriage returns) split apart."""
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-n:]


def write_text(path: Path, text: str) -> None:
    from scratchlm.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def table(report: dict) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    verdict = {True: "met", False: "not met", None: ""}
    lines = [f"GPU check, {report['mode']}: {describe_machine(report['machine'])}", "",
             "| check | status | seconds | result | target | met |", "|---|---|---|---|---|---|"]
    for row in report["checks"]:
        result = row.get("summary") or row.get("error") or ""
        lines.append(f"| {row['name']} | {row['status']} | {row['seconds']:.0f} | {cell(result)} | "
                     f"{cell(row.get('target', ''))} | {verdict[row.get('met')]} |")
    if report["mode"].startswith("tiny"):
        lines += ["", "--tiny: toy sizes on a CPU, to try the code path; the targets are for the GPU sizes."]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "gpu_check.md", table(report))


def run_check(check: Check, ctx: Context, budget_end: float) -> dict:
    limit = check.tiny_limit if ctx.tiny else check.limit
    left = budget_end - time.monotonic()
    row = {"name": check.name, "limit_s": limit}
    start = time.monotonic()
    if left < 10:
        row.update(status="skipped", seconds=0.0, error="the overall --budget was spent before this check")
        return row
    ctx.deadline, ctx.logs = start + min(limit, left), []
    try:
        outcome = check.run(ctx)
        row.update(status="ok", summary=outcome.summary, numbers=outcome.numbers, target=outcome.target,
                   met=outcome.met)
    except Skip as e:
        row.update(status="skipped", error=str(e))
    except TimedOut as e:
        row.update(status="timeout", error=f"killed after {min(limit, left):.0f} s" + (
            f"; last output: {' / '.join(e.tail[-3:])}" if e.tail else ""), stderr_tail=e.tail)
    except Failed as e:
        row.update(status="failed", error=str(e), stderr_tail=e.tail)
    except Exception as e:  # noqa: BLE001 - a bug in one check's reading of its results must not stop the others
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    row["seconds"] = time.monotonic() - start
    row["logs"] = ctx.logs
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes, minutes of CPU: the code path, not the numbers")
    p.add_argument("--data", help="text file or folder that every training check trains on (default: the recipes' own)")
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json, gpu_check.md, logs/ and runs/")
    p.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="run only these checks")
    p.add_argument("--budget", type=float, default=480.0, help="seconds after which no further check starts")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (--device cpu --tiny runs the sequence on a CPU)")
    if a.device == "cpu" and not a.tiny and not a.worker:
        p.error("--device cpu needs --tiny: the GPU sizes would take hours on a CPU")
    if a.data and not Path(a.data).exists():
        p.error(f"--data {a.data}: no such file or folder")
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a.device, a.tiny)))
        return 0

    out = Path(a.out).resolve()  # the children run from the repository root
    data = str(Path(a.data).resolve()) if a.data else None
    ctx = Context(a.device, a.tiny, data, out)
    info = machine(a.device)
    print(describe_machine(info), flush=True)
    report = {"mode": f"{'tiny, ' if a.tiny else ''}{a.device}", "machine": info, "data": data,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": []}
    budget_end = time.monotonic() + a.budget
    for check in CHECKS:
        if a.only and check.name not in a.only:
            continue
        print(f"[{check.name}] ...", flush=True)
        row = run_check(check, ctx, budget_end)
        report["checks"].append(row)
        if ctx.peak:
            report["peak"] = {"what": ctx.peak[0], "flops": ctx.peak[1]}
        save(report, out)
        print(f"[{check.name}] {row['status']} in {row['seconds']:.0f} s: {row.get('summary') or row.get('error')}",
              flush=True)
    print("\n" + table(report))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
