"""AdamW, gradient clipping and the learning-rate schedule of every trainer: linear warm-up, then constant, a linear /
cosine decay to ``min_lr_ratio`` × lr at the last step, or WSD (constant, then linear over the last ``decay_frac``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.cli_args import option

SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and its schedule (the same flags for every trainer; each command sets its own defaults)."""

    lr: float = option(1e-5, "peak learning rate", min=0)
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    lr_schedule: str = option("constant", "after warm-up", choices=SCHEDULES)
    min_lr_ratio: float = option(0.0, "the decay ends at this fraction of --lr", min=0, max=1)
    decay_frac: float = option(0.2, "wsd: the last fraction of steps decays linearly to the minimum", gt=0, max=1)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", min=0)
    betas: tuple[float, float] = option((0.9, 0.99), "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", min=0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (linear weights, experts, gate); none on norms, biases, embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]  # each shared parameter once
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    lr, lo, warmup = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return lr
    if cfg.lr_schedule == "wsd":
        start = total_steps - max(1, round(cfg.decay_frac * total_steps))
        return lr if step < start else lr + (lo - lr) * (step - start + 1) / (total_steps - start)
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    return lo + (lr - lo) * (1 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """Clip the gradients of ``module`` to total norm ``max_norm`` (0: no clipping); returns the norm before."""
    norm = nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
