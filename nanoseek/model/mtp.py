"""Multi-Token Prediction (DeepSeek-V3 §2.2, eq. 21-25): the modules, their chain, their loss, and their drafts.
Module k combines the previous depth's representation of token i with the embedding of token i+k:
h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (eq. 21), runs one transformer block (eq. 22), and predicts
t_{i+k+1} through the main model's shared head (eq. 23). Names and concatenation order follow the released V3 weights
(enorm, hnorm, eh_proj, shared_head.norm). Training runs the chain over the whole sequence (``mtp_logits``,
``mtp_loss``); inference runs it incrementally with its own cache (``draft``) for speculative decoding (V3 §5.4.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.cache import KVCache
from nanoseek.config import ModelConfig
from nanoseek.model.attention import AttentionContext, RMSNorm
from nanoseek.model.block import Block
from nanoseek.model.moe import RouterStats


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.enorm, self.hnorm = RMSNorm(D, config.rms_norm_eps), RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)  # M_k
        self.block = Block(config, layer_idx)  # TRM_k
        self.norm = RMSNorm(D, config.rms_norm_eps)  # shared_head.norm, before the shared OutHead

    def forward(self, h_prev: torch.Tensor, next_emb: torch.Tensor, ctx: AttentionContext,
                router_stats: RouterStats | None = None) -> torch.Tensor:
        """h_prev: (B, T, D) depth k-1 states of tokens i; next_emb: (B, T, D) Emb(t_{i+k}) -> h^k: (B, T, D)."""
        x = self.eh_proj(torch.cat((self.enorm(next_emb), self.hnorm(h_prev)), dim=-1))
        return self.block(x, ctx, router_stats)


def mtp_logits(model: nn.Module, h: torch.Tensor, input_ids: torch.Tensor,
               router_stats: RouterStats | None = None) -> list[torch.Tensor]:
    """The training chain (eq. 21-23) over the Transformer ``model``'s final normed states h: (B, T, D): depth k sees
    h^{k-1}_{1:T-k} and Emb(t_{k+1:T}) -> (B, T-k, vocab) logits, row i predicting t_{i+k+1}."""
    T, out = input_ids.shape[1], []
    for k, module in enumerate(model.mtp[: max(T - 1, 0)], start=1):  # depth k needs T - k >= 1 positions
        ctx = model.context(T - k, None, h.dtype)
        h = module(h[:, : T - k], model.embed_tokens(input_ids[:, k:]), ctx, router_stats)
        out.append(model.lm_head(module.norm(h)))
    return out


def mtp_loss(logits: list[torch.Tensor], targets: torch.Tensor, n_tokens: list[int], lam: float, depth: int,
             ignore_index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L_MTP = λ/D Σ_k L^k (eq. 24-25), each L^k a mean over its ``n_tokens[k]`` loss tokens of the global batch;
    targets: (B, T) next-token targets (depth k's row i predicts targets[:, i+k]) -> (the loss, each depth's CE sum)."""
    loss, sums = torch.zeros((), device=targets.device), []
    for k, lk in enumerate(logits, start=1):
        lk = lk.to(torch.promote_types(lk.dtype, torch.float32)).flatten(0, 1)  # bf16 autocast: the loss in fp32
        ce_k = F.cross_entropy(lk, targets[:, k:].reshape(-1), ignore_index=ignore_index, reduction="sum")
        loss = loss + lam / depth * ce_k / max(n_tokens[k], 1)
        sums.append(ce_k.detach())
    return loss, sums


def draft(model: nn.Module, h: torch.Tensor, tokens: torch.Tensor, cache: KVCache, counts: torch.Tensor,
          pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run the chain incrementally over the new positions of each sequence, with the MTP blocks' own ``cache``.
    h: (B, T, D) main states of positions ``cache.lengths + j`` (``counts`` (B,) of them real, the rest padding);
    tokens: (B, T + depth + 1), tokens[:, j] at position ``cache.lengths + j``; module k reads tokens[:, j + k].
    With ``pick``, module k's logits at the last real position give ``pick(logits) -> (B,)`` drafts, written to
    tokens[:, counts + k] for the next module (drafts decide what is verified, never what is output)."""
    B, T = h.shape[:2]
    rows = torch.arange(B, device=h.device)
    ctx = model.context(T, cache, h.dtype)
    for k, module in enumerate(model.mtp, start=1):
        h = module(h, model.embed_tokens(tokens[:, k : k + T]), ctx)
        if pick is not None:
            tokens[rows, counts + k] = pick(model.lm_head(module.norm(h[rows, counts - 1])))
    cache.lengths += counts
