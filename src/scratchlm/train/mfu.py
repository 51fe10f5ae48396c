"""Model FLOPs utilisation: the FLOPs a training step must do, per second, over what the device can do.

GPU peaks are the vendors' dense (no sparsity) figures for 16-bit matrix products. A CPU has no such
table, so its peak is measured: the float32 rate of a large matrix product on the threads PyTorch uses.
"""
from __future__ import annotations

import time

import torch

# Dense bf16/fp16 tensor-core peaks, FLOP/s. Matched by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}

_cpu_peak: float | None = None


def cpu_matmul_flops(n: int = 2048, seconds: float = 0.5) -> float:
    """Measured float32 matmul FLOP/s (cached for the process): the best single product within the
    time allowed, so that a moment of load from another process lowers the peak as little as it can
    (a low peak would inflate MFU past 100%)."""
    global _cpu_peak
    if _cpu_peak is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm up the kernels and thread pool
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _cpu_peak = 2 * n**3 / best
    return _cpu_peak


def peak_flops(device: torch.device) -> float | None:
    if device.type == "cpu":
        return cpu_matmul_flops()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak
    return None
