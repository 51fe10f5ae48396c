"""What this machine's hardware does well, as far as training's choices depend on it."""
from __future__ import annotations

import torch


def multiplies_bf16_natively(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware here: a CUDA device that supports them, or a CPU
    with AMX or AVX-512 BF16 units (elsewhere oneDNN converts to float32 and bf16 is slower, not faster)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # private probes of torch.cpu, read with a False default in case a release renames them
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False
