"""One decoder block, shared by the main stack and the MTP modules."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MHA, MLA, AttentionContext, RMSNorm
from nanoseek.model.moe import MLP, MoE, RouterStats


class Block(nn.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(·)); FFN is dense in the first k layers, MoE after."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config) if config.attention_type == "mla" else MHA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoE(config, layer_idx) if config.is_moe_layer(layer_idx)
                    else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, x: torch.Tensor, ctx: AttentionContext, router_stats: RouterStats | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, self.layer_idx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router_stats) if isinstance(self.mlp, MoE) else self.mlp(h))
