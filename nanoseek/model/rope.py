"""Rotary position embedding, with YaRN frequency interpolation (Peng et al. 2023; DeepSeek-V2 appendix B).
In MLA only the decoupled d_R channels carry position (V2 eq. 14-15); the MHA baseline rotates whole heads."""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp in between (beta_fast/beta_slow).
    -> (inverse frequencies (dim/2,), the factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim))."""
    factor, original_max = float(rope_scaling["factor"]), int(rope_scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = rope_scaling.get("beta_fast") or 32, rope_scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if (attention_factor := rope_scaling.get("attention_factor")) is None:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) \
            if mscale and mscale_all_dim else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the channel that turns `rotations` times over original_max
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: divide it by `factor`
    return (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, rs = config.rope_dim, config.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(dim, config.rope_theta, rs)
        else:
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) -> cos, sin: (..., T, dim/2), already times YaRN's attention factor."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate channel pairs of x: (..., T, d) by cos/sin: (..., T, d/2). ``interleave`` pairs (x0, x1), (x2, x3), ...
    (DeepSeek's weights), else (x_i, x_{i+d/2}); the output is half-split either way (q, k alike: q·k unchanged)."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
