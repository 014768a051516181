"""Multi-head Latent Attention (DeepSeek-V2 §2.1) and the plain MHA/GQA baseline of the same width. Symbols
(V2 eq. 9-19): h (hidden), c_KV = W_DKV h (latent, d_c = kv_lora_rank), k_C/v_C = W_UK/W_UV c_KV (`kv_b_proj`),
c_Q = W_DQ h (`q_a_proj`, d_c' = q_lora_rank), q_C = W_UQ c_Q and q_R = W_QR c_Q (`q_b_proj`), k_R = RoPE(W_KR h) (the
shared RoPE key, d_R = qk_rope_head_dim, the tail of `kv_a_proj_with_mqa`). Two ways to attend over cached latents, side
by side as in DeepSeek-V3's inference/model.py: ``naive`` expands the latent back to per-head keys/values through W_UK,
W_UV (training and prefill: compute-bound, T queries share the expansion); ``absorb`` folds W_UK into the query and W_UV
into the output, q_C·k_C = (W_UKᵀ q_C)·c_KV, so decode reads only c_KV and k_R once for all heads (memory-bound decode;
V2 §2.1.2 "absorbed into W_Q / W_O")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.cache import KVCache
from nanoseek.config import ModelConfig
from nanoseek.model.rope import apply_rope

ABSORB_MAX_QUERY_LEN = 8  # cached forwards of at most this many new tokens (decode, verify) take the absorbed path


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (as the released models and transformers do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # fewer dispatches than below: 28 vs 40 µs per call on CPU
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


@dataclass
class AttentionContext:
    """What every attention layer of one forward shares: RoPE tables and, with a cache, where to write/read."""

    cos: torch.Tensor  # (T, d/2) or (B, 1, T, d/2): broadcast over heads
    sin: torch.Tensor
    cache: KVCache | None = None
    positions: torch.Tensor | None = None  # (B, T) absolute positions of the new tokens
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool, True = may attend; None = plain causal
    kv_len: int = 0  # S: cached slots to read (max length after this write)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.d_c, self.interleave = config.kv_lora_rank, config.rope_interleave
        self.softmax_scale, self.dropout = config.softmax_scale(), config.attention_dropout
        self.decode_impl = "absorb"  # "absorb" | "naive": which path a cached decode step takes
        d_qk, bias = self.d_nope + self.d_rope, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * d_qk, bias=False)  # [W_UQ; W_QR]
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.d_c + self.d_rope, bias=bias)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.d_c)
        self.kv_b_proj = nn.Linear(self.d_c, self.n_heads * (self.d_nope + self.d_v), bias=False)  # [W_UK; W_UV]
        self.o_proj = nn.Linear(self.n_heads * self.d_v, config.hidden_size, bias=bias)  # W_O

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer_idx: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)  # (B, H, T, d_h + d_R)
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, self.interleave)  # q_R (eq. 15)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.d_c, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # c_KV: (B, T, d_c) (eq. 9)
        k_pe = apply_rope(k_pe[:, None], ctx.cos, ctx.sin, self.interleave)[:, 0]  # k_R: (B, T, d_R), one for all heads

        if ctx.cache is not None:
            ctx.cache.write(layer_idx, ctx.positions, latent=torch.cat((c_kv, k_pe), dim=-1))
            latent = ctx.cache.read(layer_idx, "latent", ctx.kv_len)  # [c_KV | k_R]: (B, S, d_c + d_R)
            c_kv, k_pe = latent.split([self.d_c, self.d_rope], dim=-1)
        if ctx.cache is not None and self.decode_impl == "absorb" and T <= ABSORB_MAX_QUERY_LEN:
            out = self.attend_absorbed(q_nope, q_pe, latent, ctx.mask)
        else:  # training, prefill, or the naive decode
            out = self.attend_expanded(q_nope, q_pe, c_kv, k_pe, ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Naive path: k_C, v_C = W_UK c_KV, W_UV c_KV for every key (eq. 10-11, 17-18). Returns (B, H, T, d_v)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # (B, H, S, d_h), (B, H, S, d_v)
        k = torch.cat((k_nope, k_pe[:, None].expand(B, self.n_heads, S, self.d_rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        pad = q.shape[-1] - self.d_v  # SDPA's fused CPU kernels need v's head size equal to q's
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask,
                                             is_causal=mask is None, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out[..., : self.d_v]

    def attend_absorbed(self, q_nope, q_pe, latent, mask):
        """Absorbed path: score and mix in latent space, never expanding keys/values. Returns (B, H, T, d_v).
        q_C·k_C + q_R·k_R = [W_UKᵀ q_C | q_R]·[c_KV | k_R] (eq. 17 with W_UK absorbed into the query), so the H·T
        queries attend over one shared key/value head, the cached row itself: one fused attention call reads the
        cache once for all heads (MQA-like traffic), and the first d_c columns of its output are Σ_j p_ij c_KV,j."""
        (B, H, T, _), S = q_nope.shape, latent.shape[1]
        w = self.kv_b_proj.weight.view(H, self.d_nope + self.d_v, self.d_c)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope :]  # (H, d_h, d_c), (H, d_v, d_c)
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(H, B * T, self.d_nope), w_uk)  # W_UKᵀ q_C: (H, B·T, d_c)
        q = torch.cat((q_lat.view(H, B, T, self.d_c).transpose(0, 1), q_pe), dim=-1)  # (B, H, T, d_c + d_R)
        if mask is not None:
            mask = mask.expand(B, H, T, S).reshape(B, 1, H * T, S)
        kv = latent[:, None]  # (B, 1, S, d_c + d_R): key and value (the value's last d_R columns are dropped)
        o = F.scaled_dot_product_attention(q.reshape(B, 1, H * T, -1), kv, kv, attn_mask=mask, scale=self.softmax_scale)
        o_lat = o[..., : self.d_c].reshape(B, H, T, self.d_c)  # Σ_j p_ij c_KV,j
        out = torch.bmm(o_lat.transpose(0, 1).reshape(H, B * T, self.d_c), w_uv.transpose(1, 2))  # W_UV o per head
        return out.view(H, B, T, self.d_v).transpose(0, 1)


class MHA(nn.Module):
    """Plain multi-head (num_key_value_heads = heads) or grouped-query attention with full RoPE: the baseline."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.softmax_scale, self.dropout, bias = config.softmax_scale(), config.attention_dropout, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.d, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer_idx: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.d).transpose(1, 2), ctx.cos, ctx.sin, False)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2), ctx.cos, ctx.sin, False)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        if ctx.cache is not None:  # cached as (B, S, n_kv·d)
            ctx.cache.write(layer_idx, ctx.positions, k=k.transpose(1, 2).flatten(2), v=v.transpose(1, 2).flatten(2))
            k, v = (ctx.cache.read(layer_idx, name, ctx.kv_len).unflatten(2, (self.n_kv, self.d)).transpose(1, 2)
                    for name in ("k", "v"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                             scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d))
