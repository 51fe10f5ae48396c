"""Model FLOPs utilisation: the FLOPs a training step must do, per second, over what the device can do.

GPU peaks are the vendors' dense (no sparsity) figures for 16-bit matrix products. A CPU has no such
table, so its peak is measured: the rate of a large matrix product on the threads PyTorch uses, in the
dtype the products run in (float32, or bfloat16 under autocast, which AMX units run several times faster).
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

_cpu_peak: dict[torch.dtype, float] = {}


def matmul_flops(n: int = 2048, seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of an n x n by n x n product in `dtype` on this process's threads: the best single
    product within the time allowed, so that a moment of load from another process lowers the figure as
    little as it can (a low peak would inflate MFU past 100%)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up the kernels and thread pool
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cpu_matmul_flops(dtype: torch.dtype = torch.float32) -> float:
    """`matmul_flops` in `dtype`, measured once a process."""
    if dtype not in _cpu_peak:
        _cpu_peak[dtype] = matmul_flops(dtype=dtype)
    return _cpu_peak[dtype]


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    if device.type == "cpu":
        return cpu_matmul_flops(dtype=dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak
    return None


class Throughput:
    """Tokens per second, and MFU where the device's peak is known, over the steps since the last reading."""

    def __init__(self, flops_per_token: float, peak: float | None, world: int = 1):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.tokens, self.seconds, self.flops = 0, 0.0, 0.0

    def add(self, tokens: int, seconds: float, flops_per_token: float | None = None) -> None:
        """`flops_per_token`: for steps of rows shorter than the context, whose attention costs less."""
        self.tokens += tokens
        self.seconds += seconds
        self.flops += tokens * (flops_per_token or self.flops_per_token)

    def read(self) -> dict:
        seconds = max(self.seconds, 1e-9)
        row = {"tokens_per_s": self.tokens / seconds}
        if self.peak:
            row["mfu"] = self.flops / seconds / self.world / self.peak
        self.tokens, self.seconds, self.flops = 0, 0.0, 0.0
        return row
