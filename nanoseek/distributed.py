"""torch.distributed helpers for ``torchrun``: the same script runs as 1 or N processes. ``init_distributed()`` joins
a gloo (CPU) or nccl (GPU) process group under torchrun; without one, everything here is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def device_of(name: str | None) -> torch.device:
    """``--device``: "cpu", "cuda" or "cuda:N"; None means cuda when available, else the CPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return torch.device(name)


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device), joining the process group under torchrun; "cuda" is this process's local GPU."""
    device = device_of(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if is_distributed() else 0), world_size(), device


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum, max or min across ranks (identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    return all_reduce_(torch.tensor(values, dtype=torch.float64), op).tolist()


def global_std(values: torch.Tensor) -> float:
    """The unbiased std of every rank's values together (0 for fewer than two)."""
    x = values.double()
    s, s2, n = reduce_floats([float(x.sum()), float((x**2).sum()), float(x.numel())])
    mean = s / max(n, 1)
    return (max(s2 - n * mean * mean, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module`` over ranks (a parameter without a gradient counts as zeros)."""
    for p in [p for p in module.parameters() if p.requires_grad and is_distributed()]:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group; ``synchronize`` (not after errors): wait for all ranks (no exit mid-collective)."""
    if is_distributed():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, mode: str = "ddp", find_unused_parameters: bool = False) -> nn.Module:
    """DDP (gradients averaged in backward) or FSDP2 ``fully_shard`` per block, then the root; as is on one process."""
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
    # an MTP module's block is its own unit; its norms/projection, used outside that forward, stay in the root unit
    for block in [*getattr(model, "layers", []), *(module.block for module in getattr(model, "mtp", []))]:
        fully_shard(block)
    fully_shard(model)
    return model
