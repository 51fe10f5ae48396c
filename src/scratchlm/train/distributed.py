"""Everything that knows there may be more than one process: `torchrun` setup, DDP and FSDP2 wrapping,
and whole (unsharded) state dicts for checkpoints. The model itself knows none of this.

Under `torchrun` each process trains on its slice of every global batch (see data.loader.RandomWindows),
gradients are averaged, and rank 0 alone writes files. A checkpoint holds unsharded tensors keyed by
parameter name, so it resumes on any number of processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from scratchlm.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> Dist:
    """Join the process group when started by torchrun (which sets WORLD_SIZE); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local_rank)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module to run forward and backward through: the model itself, DDP around it, or the model
    sharded in place by FSDP2 (one unit per block, then the rest)."""
    if not d.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise UserError(f"train.parallel = {strategy!r} is not one of ddp, fsdp")


def _parts(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "parts", [optimizer]))


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU, keyed by parameter name (on rank 0; other ranks may get nothing)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer state keyed by parameter name rather than by position, unsharded."""
    return get_optimizer_state_dict(model, _parts(optimizer), options=_FULL)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, _parts(optimizer), state, options=StateDictOptions(full_state_dict=True))
    # Hyper-parameters come back as lists (AdamW's betas), from JSON and from set_optimizer_state_dict
    # alike; in an optimizer's own param_groups only "params" is a list.
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)


def mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo, CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def max_across(values: tuple[float, ...], d: Dist) -> tuple[float, ...]:
    """The largest of each value over all processes (one collective for them all)."""
    if not d.active:
        return tuple(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())
