"""Multi-Token Prediction (DeepSeek-V3 §2.2, eq. 21-23).

Module k combines the previous depth's representation of token i with the embedding of token i+k:
h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], runs one transformer block, and predicts t_{i+k+1}
through the shared output head. Embedding and head are the main model's (shared), so only the norms, the
projection M_k (`eh_proj`) and the block are new. Names follow the released V3 weights (enorm, hnorm,
eh_proj, shared_head.norm); the concatenation order is theirs too (embedding first).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import AttentionContext, RMSNorm
from nanoseek.model.block import Block
from nanoseek.model.moe import RouterStats


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)  # M_k
        self.block = Block(config, layer_idx)  # TRM_k
        self.norm = RMSNorm(D, config.rms_norm_eps)  # shared_head.norm, before the shared OutHead

    def forward(self, h_prev: torch.Tensor, next_emb: torch.Tensor, ctx: AttentionContext,
                router_stats: RouterStats | None = None) -> torch.Tensor:
        """h_prev: (B, T, D) depth k-1 states of tokens i; next_emb: (B, T, D) Emb(t_{i+k}) -> h^k: (B, T, D)."""
        x = self.eh_proj(torch.cat((self.enorm(next_emb), self.hnorm(h_prev)), dim=-1))
        return self.block(x, ctx, router_stats)
