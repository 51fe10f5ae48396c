"""Where and in what precision code runs: device choice, compute dtype, autocast, CPU count.

The ground floor for every stage that touches a model: serving, chat and evaluation import this, not the
training loop.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING, Iterator

from scratchlm.errors import UserError

# torch is imported inside the functions that use it: the data stage asks only for the CPU count, and
# loading torch would add about 200 MB to it and to each of its worker processes.
if TYPE_CHECKING:
    import torch

def pick_device(name: str, setting: str = "--device") -> torch.device:
    """The device called `name`: auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or
    mps. UserError naming `setting` (the flag or config field it came from) for any other name, or for a
    device this machine does not have."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps:
            raise UserError(f"{setting} mps: Apple's MPS is not available on this machine; use cpu or auto")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise UserError(f"{setting} {name!r} is not a device; use one of auto, cpu, cuda, cuda:N, mps")
    if not torch.cuda.is_available():
        raise UserError(f"{setting} {name}: no CUDA device is visible; use cpu or auto")
    count = torch.cuda.device_count()
    if match[1] is not None and int(match[1]) >= count:
        raise UserError(f"{setting} {name}: this machine has {count} CUDA device{'s' * (count != 1)}, "
                        f"cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def multiplies_bf16_natively(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware here: a CUDA device that supports them, or a CPU
    with AMX or AVX-512 BF16 units (elsewhere oneDNN converts to float32 and bf16 is slower, not faster)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # private probes of torch.cpu, read with a False default in case a release renames them
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of the matrix products that `train.precision` asks for on this device."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    elif precision == "bf16-native":
        precision = "bf16" if multiplies_bf16_natively(device) else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise UserError(f"train.precision = {precision!r} is not one of auto, bf16-native, fp32, bf16, fp16")
    return dtype


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts, or None for plain float32. Autocast computes matrix products in
    16 bits while the parameters (and so the optimizer) stay float32."""
    import torch

    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def usable_cpus() -> int:
    """CPUs this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with the model in eval mode (no dropout) and give it back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
