"""scratchlm's Triton FlashAttention-2 kernel against PyTorch SDPA (flash backend), forward and backward.

    python bench/attention.py                          # causal, bf16, T = 512..8192, head size 64 and 128
    python bench/attention.py --alibi --kv-heads 8     # ALiBi and GQA (the peer then runs with a float mask)
    python bench/attention.py --json attention.jsonl   # also append one JSON line per measurement

Shapes follow the FlashAttention-2 paper's benchmark: 16k tokens per batch (batch = 16384 / T) and a model
width of 2048 (32 heads of 64, or 16 of 128), enough to fill a large GPU at every length.

FLOPs, counted the standard way (as in the FlashAttention papers): the forward pass is two matrix
products of 2 * T * T * D each per head, 4 * B * H * T^2 * D; causal masking halves that (only the
lower triangle is useful work): 2 * B * H * T^2 * D. The backward pass is counted as 2.5 times the
forward (five products, one of them the recomputed Q K^T). Both kernels are credited the same count, so
the TFLOP/s ratio is the inverse of the time ratio.

Times are medians over --repeats CUDA-event timings after warm-up (which includes Triton's autotuning).
Without a CUDA device the script prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F


def gpu_description() -> str:
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return f"{name}, driver {driver}"


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def causal_flops(B: int, H: int, T: int, D: int) -> tuple[float, float]:
    forward = 2.0 * B * H * T * T * D  # 4 B H T^2 D for the two products, halved by the causal mask
    return forward, 2.5 * forward


def measure(T: int, D: int, a) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchlm.model.flash_triton import flash_attention
    from scratchlm.model.positions import alibi_bias, alibi_slopes

    B, H = max(1, a.tokens // T), a.width // D
    Hk = a.kv_heads or H
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(B, Hk, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    do = torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g)
    slopes = alibi_slopes(H).cuda() if a.alibi else None

    def ours():
        return flash_attention(q, k, v, causal=True, alibi_slopes=slopes)

    if a.alibi:
        # SDPA's flash backend takes no bias; the peer is then SDPA's choice with a float mask.
        pos = torch.arange(T, device="cuda")
        mask = alibi_bias(slopes, pos, pos).masked_fill(pos[None, :] > pos[:, None], float("-inf")).to(dtype)
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    else:
        mask = None
        backends = [SDPBackend.FLASH_ATTENTION]

    def peer():
        kk, vv = k, v
        if Hk != H:  # the repeat is part of what GQA costs the peer
            kk, vv = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None)

    row = {"T": T, "D": D, "B": B, "H": H, "H_kv": Hk, "alibi": a.alibi}
    out_ours, out_peer = ours(), peer()
    row["max_abs_diff"] = (out_ours.float() - out_peer.float()).abs().max().item()
    fwd_flops, bwd_flops = causal_flops(B, H, T, D)
    for name, fn in (("ours", ours), ("sdpa", peer)):
        row[f"fwd_ms_{name}"] = median_ms(fn, a.repeats)
        out = fn()
        row[f"bwd_ms_{name}"] = median_ms(lambda out=out: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                                          a.repeats)
        row[f"fwd_tflops_{name}"] = fwd_flops / row[f"fwd_ms_{name}"] / 1e9
        row[f"bwd_tflops_{name}"] = bwd_flops / row[f"bwd_ms_{name}"] / 1e9
        del out
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
    p.add_argument("--json", help="append each measurement as one JSON line to this file")
    a = p.parse_args()

    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (the Triton kernel is tested on CPU by the test suite); skipped")
        return
    try:
        import triton
    except ImportError:
        print("bench/attention.py needs Triton (pip install triton); skipped")
        return

    print(f"{gpu_description()}; torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}; bf16, causal{', ALiBi' if a.alibi else ''}"
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
            if a.json:
                r["device"] = gpu_description()
                r["torch"], r["triton"] = torch.__version__, triton.__version__
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"time ours / sdpa, geometric mean over forward and backward: {geo:.2f}x (target: 1.2x or less)")


if __name__ == "__main__":
    sys.exit(main())
