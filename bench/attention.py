"""scratchlm's Triton FlashAttention-2 kernel against PyTorch SDPA (flash backend), forward and backward.

    python bench/attention.py                          # causal, bf16, T = 512..8192, head size 64 and 128
    python bench/attention.py --alibi --kv-heads 8     # ALiBi and GQA (the peer then runs with a float mask)
    python bench/attention.py --json attention.jsonl   # also append one JSON line per measurement
    python bench/attention.py --reference              # also the error of ours and SDPA against float64 attention
    python bench/attention.py --device cpu --seqlens 32 --head-dims 16 --tokens 32 --width 32 --repeats 1
                                                       # the same code on CPU, through Triton's interpreter

Shapes follow the FlashAttention-2 paper's benchmark: 16k tokens per batch (batch = 16384 / T) and a model
width of 2048 (32 heads of 64, or 16 of 128), enough to fill a large GPU at every length.

FLOPs, counted the standard way (as in the FlashAttention papers): the forward pass is two matrix
products of 2 * T * T * D each per head, 4 * B * H * T^2 * D; causal masking halves that (only the
lower triangle is useful work): 2 * B * H * T^2 * D. The backward pass is counted as 2.5 times the
forward (five products, one of them the recomputed Q K^T). Both kernels are credited the same count, so
the TFLOP/s ratio is the inverse of the time ratio.

Times are medians over --repeats CUDA-event timings after warm-up (which includes Triton's autotuning).
Without a CUDA device the script prints one line and exits 0, unless `--device cpu` asks for Triton's
interpreter (TRITON_INTERPRET=1, float32): its times mean nothing, but every line of the script runs, so
a change to it is tried before it meets a GPU.

`--reference` also measures errors against attention written out in float64 (causal mask, repeated K/V
heads, ALiBi): the output and the three input gradients of ours and of SDPA, both fed the same rounded
inputs. The reference needs (T, T) scores per head, so it runs on one sequence and the first
`--ref-heads` query heads (with their K/V heads), not on the timed batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def gpu_description(device: str = "cuda") -> str:
    if device != "cuda":
        return f"{platform.processor() or platform.machine()} CPU, Triton interpreter"
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return f"{name}, driver {driver}"


def median_ms(fn, repeats: int, warmup: int = 3, device: str = "cuda") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


# The dtype timed on each device: the interpreter runs float32 (numpy has no bfloat16).
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}


def causal_flops(B: int, H: int, T: int, D: int) -> tuple[float, float]:
    forward = 2.0 * B * H * T * T * D  # 4 B H T^2 D for the two products, halved by the causal mask
    return forward, 2.5 * forward


def make_peer(H: int, T: int, slopes: torch.Tensor | None, dtype: torch.dtype, device: str):
    """PyTorch SDPA as the peer runs it: its flash backend, or with ALiBi (which that backend cannot add) a
    float mask, built once, for the backends that take one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchlm.model.positions import alibi_bias

    if slopes is None:
        mask, backends = None, [SDPBackend.FLASH_ATTENTION]
    else:
        pos = torch.arange(T, device=device)
        mask = alibi_bias(slopes, pos, pos).masked_fill(pos[None, :] > pos[:, None], float("-inf")).to(dtype)
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def peer(q, k, v):
        if k.shape[1] != H:  # the repeat is part of what GQA costs the peer
            k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)

    return peer


def reference(q, k, v, slopes):
    """Causal softmax attention written out in float64, K/V heads repeated, ALiBi added to the scores."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pos = torch.arange(q.shape[2], device=q.device)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if slopes is not None:
        scores = scores + slopes.double()[:, None, None] * (pos[None, :] - pos[:, None]).double()
    return scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1) @ v


def reference_errors(T: int, D: int, H: int, Hk: int, dtype: torch.dtype, a) -> dict:
    """Largest absolute error of ours and of SDPA against `reference`: output, dq, dk, dv."""
    from scratchlm.model.flash_triton import flash_attention
    from scratchlm.model.positions import alibi_slopes

    group = H // Hk
    kv = max(1, min(Hk, a.ref_heads // group))
    h = kv * group
    g = torch.Generator(device=a.device).manual_seed(1)
    # Rounded to the timed dtype first, so that the reference sees exactly the inputs the kernels see.
    q, k, v, do = (torch.randn(1, n, T, D, device=a.device, generator=g).to(dtype) for n in (h, kv, kv, h))
    slopes = alibi_slopes(H)[:h].to(a.device) if a.alibi else None

    def run(fn, dt):
        xs = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        return [out.double(), *(t.double() for t in torch.autograd.grad(out, xs, do.to(dt)))]

    want = run(lambda q, k, v: reference(q, k, v, slopes), torch.float64)
    sides = {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True, alibi_slopes=slopes),
             "sdpa": make_peer(h, T, slopes, dtype, a.device)}
    row = {"ref_heads": h, "ref_kv_heads": kv}
    for name, fn in sides.items():
        for part, got, ref in zip(("out", "dq", "dk", "dv"), run(fn, dtype), want):
            row[f"err_{name}_{part}"] = (got - ref).abs().max().item()
    return row


def measure(T: int, D: int, a) -> dict:
    from scratchlm.model.flash_triton import flash_attention
    from scratchlm.model.positions import alibi_slopes

    B, H = max(1, a.tokens // T), a.width // D
    Hk = a.kv_heads or H
    dtype = DTYPES[a.device]
    g = torch.Generator(device=a.device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=a.device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device=a.device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(B, Hk, T, D, device=a.device, dtype=dtype, generator=g, requires_grad=True)
    do = torch.randn(B, H, T, D, device=a.device, dtype=dtype, generator=g)
    slopes = alibi_slopes(H).to(a.device) if a.alibi else None
    sdpa = make_peer(H, T, slopes, dtype, a.device)

    def ours():
        return flash_attention(q, k, v, causal=True, alibi_slopes=slopes)

    def peer():
        return sdpa(q, k, v)

    row = {"T": T, "D": D, "B": B, "H": H, "H_kv": Hk, "alibi": a.alibi, "dtype": str(dtype).removeprefix("torch.")}
    out_ours, out_peer = ours(), peer()
    row["max_abs_diff"] = (out_ours.float() - out_peer.float()).abs().max().item()
    del out_ours, out_peer
    fwd_flops, bwd_flops = causal_flops(B, H, T, D)
    for name, fn in (("ours", ours), ("sdpa", peer)):
        row[f"fwd_ms_{name}"] = median_ms(fn, a.repeats, a.warmup, a.device)
        out = fn()
        row[f"bwd_ms_{name}"] = median_ms(lambda out=out: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                                          a.repeats, a.warmup, a.device)
        row[f"fwd_tflops_{name}"] = fwd_flops / row[f"fwd_ms_{name}"] / 1e9
        row[f"bwd_tflops_{name}"] = bwd_flops / row[f"bwd_ms_{name}"] / 1e9
        del out
    if a.reference:
        row.update(reference_errors(T, D, H, Hk, dtype, a))
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=16384, help="batch * sequence length")
    p.add_argument("--width", type=int, default=2048, help="heads * head size")
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (GQA); 0: as many as query heads")
    p.add_argument("--alibi", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each timing")
    p.add_argument("--reference", action="store_true", help="also the errors of ours and SDPA against float64")
    p.add_argument("--ref-heads", type=int, default=4, help="query heads of the one sequence the reference runs on")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: Triton's interpreter, float32 (slow, and its times mean nothing)")
    p.add_argument("--json", help="append each measurement as one JSON line to this file")
    a = p.parse_args()

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (the Triton kernel is tested on CPU by the test suite, "
              "and --device cpu runs this script through Triton's interpreter); skipped")
        return
    if a.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before their module loads
    try:
        import triton
    except ImportError:
        print("bench/attention.py needs Triton (pip install triton); skipped")
        return

    dtype = str(DTYPES[a.device]).removeprefix("torch.")
    print(f"{gpu_description(a.device)}; torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}; {dtype}, causal{', ALiBi' if a.alibi else ''}"
          f"{f', {a.kv_heads} kv heads' if a.kv_heads else ''}")
    head = (f"{'T':>5} {'D':>4} {'B':>3} {'H':>3} | {'fwd ms':>15} {'TFLOP/s':>13} {'time x':>6} | "
            f"{'bwd ms':>15} {'TFLOP/s':>13} {'time x':>6} | {'max diff':>8}")
    print(head)
    print(f"{'':>19} | {'ours / sdpa':>15} {'ours / sdpa':>13} {'':>6} |")
    ratios = []
    for D in (int(x) for x in a.head_dims.split(",")):
        for T in (int(x) for x in a.seqlens.split(",")):
            r = measure(T, D, a)
            fx, bx = r["fwd_ms_ours"] / r["fwd_ms_sdpa"], r["bwd_ms_ours"] / r["bwd_ms_sdpa"]
            ratios += [fx, bx]
            print(f"{T:>5} {D:>4} {r['B']:>3} {r['H']:>3} | "
                  f"{r['fwd_ms_ours']:>7.3f}/{r['fwd_ms_sdpa']:<7.3f} "
                  f"{r['fwd_tflops_ours']:>6.1f}/{r['fwd_tflops_sdpa']:<6.1f} {fx:>6.2f} | "
                  f"{r['bwd_ms_ours']:>7.3f}/{r['bwd_ms_sdpa']:<7.3f} "
                  f"{r['bwd_tflops_ours']:>6.1f}/{r['bwd_tflops_sdpa']:<6.1f} {bx:>6.2f} | {r['max_abs_diff']:>8.1e}",
                  flush=True)
            if a.reference:
                print(f"{'':>19} | float64 error on {r['ref_heads']} heads, ours / sdpa: " + ", ".join(
                    f"{part} {r[f'err_ours_{part}']:.1e}/{r[f'err_sdpa_{part}']:.1e}" for part in ("out", "dq", "dk", "dv")),
                    flush=True)
            if a.json:
                r["device"] = gpu_description(a.device)
                r["torch"], r["triton"] = torch.__version__, triton.__version__
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"time ours / sdpa, geometric mean over forward and backward: {geo:.2f}x (target: 1.2x or less)")


if __name__ == "__main__":
    sys.exit(main())
