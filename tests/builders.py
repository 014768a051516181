"""Test helpers shared across files: one way to give a model random, non-trivial weights."""

import torch


def randomize_(module: torch.nn.Module, seed: int = 1, scale: float = 0.15, biases: bool = True) -> None:
    """Random weights everywhere, norms and (with ``biases``) MoE correction biases included, so outputs differ
    strongly across tokens and no code path hides behind zeros or ones: norm weights 1 + 0.3·N(0, 1), correction
    biases 0.1·N(0, 1), everything else ``scale``·N(0, 1). RoPE tables and integer buffers are left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if "inv_freq" in name or not t.is_floating_point() or (
                    not biases and name.endswith("e_score_correction_bias")):
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * noise)
            elif t.dim() == 1:
                t.copy_(1 + 0.3 * noise)
            else:
                t.copy_(scale * noise)
