"""The learning-rate schedule of every trainer (pretrain, SFT, GRPO, PPO): linear warm-up, then constant, or a
linear / cosine decay to ``min_lr_ratio`` × lr at the last step, or WSD (warmup-stable-decay: constant, then a
linear decay over the last ``decay_frac`` of the steps)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "wsd")


def lr_at(step: int, lr: float, total_steps: int, warmup: int = 0, schedule: str = "constant",
          min_lr_ratio: float = 0.0, decay_frac: float = 0.2) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    lo = lr * min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = total_steps - max(1, round(decay_frac * total_steps))
        if step < decay_start:
            return lr
        return lr + (lo - lr) * (step - decay_start + 1) / (total_steps - decay_start)
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if schedule == "linear":
        return lo + (lr - lo) * (1 - progress)
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * progress))
