"""Training FLOPs per token, the device's measured peak, and model FLOPs utilization (PaLM appendix B)."""

from __future__ import annotations

import time

import torch

from nanoseek.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of a ``seq_len`` row: 3 × the forward's matmul FLOPs (backward = two forwards), 2 per
    multiply-add. Counted: attention projections, scores and values over the full ``seq_len``² matrix (as
    ``torch.utils.flop_counter`` counts SDPA; a causal kernel skips about half), dense FFNs, router, shared and active
    routed experts, LM head, MTP depth k on seq_len − k positions; not norms, RoPE, softmax, embedding lookup."""
    D, H, E = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts
    if cfg.attention_type == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        q = D * H * d_qk if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * H * d_qk
        kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + d_v)
        projections = q + kv + H * d_v * D
    else:
        d_qk = d_v = cfg.head_dim
        projections = 2 * D * H * d_qk + 2 * D * cfg.num_key_value_heads * d_qk

    def block(layer_idx: int, positions: int) -> int:
        ffn = (D * E + 3 * D * cfg.moe_intermediate_size * (cfg.n_shared_experts + cfg.num_experts_per_tok)
               if cfg.is_moe_layer(layer_idx) else 3 * D * cfg.intermediate_size)
        return positions * (projections + ffn + positions * H * (d_qk + d_v))

    L, V = cfg.num_hidden_layers, cfg.vocab_size
    macs = sum(block(i, seq_len) for i in range(L)) + seq_len * D * V
    for k in range(1, min(cfg.num_nextn_predict_layers, seq_len - 1) + 1):
        macs += block(L + k - 1, seq_len - k) + (seq_len - k) * (2 * D * D + D * V)  # + eh_proj and the head
    return 3 * 2 * macs / seq_len


def measure_peak_flops(device: str | torch.device, dtype: torch.dtype, size: int | None = None,
                       repeats: int = 10) -> float:
    """The best FLOP/s of ``repeats`` timed ``size``² matmuls after a warm-up (the best: other jobs lower it less)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(2, size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    seconds = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds[1:])


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: the training FLOP/s achieved over the device's peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak
