"""torch.distributed helpers for ``torchrun``: the same script runs as 1 or N processes.

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins a gloo (CPU) or
nccl (GPU) process group; without it everything here is a no-op on a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank(), world_size(), device


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce across ranks (identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world: int) -> range:
    """This rank's contiguous share of n items; ranks differ by at most one item."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def wrap_model(model: nn.Module, mode: str = "ddp", find_unused_parameters: bool = False) -> nn.Module:
    """DDP (gradients averaged over ranks in backward) or FSDP2 ``fully_shard`` per block then the root.

    Returns the model unchanged on a single process.
    """
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"distributed mode must be 'ddp' or 'fsdp', got {mode!r}")
    if not is_distributed():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise RuntimeError("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6; use mode='ddp'") from e
    for layer in getattr(model, "layers", []):
        fully_shard(layer)
    for module in getattr(model, "mtp", []):  # its norms/projection are used outside its forward: root unit
        fully_shard(module.block)
    fully_shard(model)
    return model
