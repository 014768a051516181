"""The DeepSeek-V2/V3 decoder: embedding, L pre-norm blocks (attention + dense FFN or MoE), final norm, head,
and optional MTP modules. ``forward(input_ids, cache=None) -> logits (B, T, vocab)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nanoseek import hf
from nanoseek.cache import KVCache, cache_widths
from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA, AttentionContext, RMSNorm
from nanoseek.model.block import Block
from nanoseek.model.moe import Experts, Gate, MoE, RouterStats
from nanoseek.model.mtp import MTPModule, mtp_logits
from nanoseek.model.rope import RotaryEmbedding


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(L))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, L + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Gate | Experts):  # the router's weight; the stacked expert weights
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    def context(self, seq_len: int, cache: KVCache | None, dtype: torch.dtype) -> AttentionContext:
        """RoPE tables for the new tokens and, with a cache, their write positions and the attention mask."""
        device = self.embed_tokens.weight.device
        steps = torch.arange(seq_len, device=device)
        if cache is None:
            return AttentionContext(*self.rotary(steps, dtype))
        positions = cache.lengths[:, None] + steps  # (B, T)
        kv_len = int(cache.lengths.max()) + seq_len
        if kv_len > cache.max_len:
            raise ValueError(f"cache overflow: {kv_len} tokens needed, cache holds {cache.max_len}")
        cos, sin = self.rotary(positions[:, None], dtype)  # (B, 1, T, d/2)
        keys = torch.arange(kv_len, device=device)
        mask = (keys[None, None, None, :] <= positions[:, None, :, None])  # causal in absolute positions
        return AttentionContext(cos, sin, cache, positions, mask, kv_len)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                input_lengths: torch.Tensor | None = None, return_mtp: bool = False, return_hidden: bool = False,
                router_stats: RouterStats | None = None):
        """input_ids: (B, T) -> logits (B, T, vocab). With ``cache``, the tokens continue each sequence at
        ``cache.lengths``, which advance by ``input_lengths`` (B,) (default T; shorter rows are right-padded).
        ``return_mtp`` adds the MTP logits; ``return_hidden`` returns the final normed states (B, T, D) instead of
        logits; ``router_stats`` collects every MoE layer's load (and balance loss), the MTP modules' included."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        ctx = self.context(T, cache, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx, router_stats)
        h = self.norm(x)
        if cache is not None:
            cache.lengths += T if input_lengths is None else input_lengths
        out = h if return_hidden else self.lm_head(h)
        return (out, mtp_logits(self, h, input_ids, router_stats)) if return_mtp else out

    def new_cache(self, batch_size: int, max_len: int, *, mtp: bool = False, dtype: torch.dtype | None = None
                  ) -> KVCache:
        """``batch_size`` sequences of up to ``max_len`` tokens; ``mtp``: for the MTP blocks."""
        n_layers = len(self.mtp) if mtp else self.config.num_hidden_layers
        return KVCache(cache_widths(self.config), n_layers, batch_size, max_len,
                       dtype=dtype or self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device,
                       layer_offset=self.config.num_hidden_layers if mtp else 0)

    def set_decode_impl(self, impl: str) -> None:
        """Choose the MLA decode path: "absorb" (default) or "naive" (re-expand the cached latent)."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.decode_impl = impl

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main blocks first, then the MTP blocks'."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_parameters(self, include_mtp: bool = False) -> int:
        """Parameters counted once (tied weights are yielded once), the MTP modules' if ``include_mtp``."""
        return sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))

    def num_active_parameters(self) -> int:
        """Parameters one token touches (main model): all but the routed experts it is not sent to."""
        c = self.config
        idle = sum((c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
                   for i in range(c.num_hidden_layers) if c.is_moe_layer(i))
        return self.num_parameters() - idle

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> Transformer:
        """Load a Hugging Face deepseek_v2/v3 directory (one or sharded safetensors), or a run directory's latest."""
        from nanoseek.checkpoint import resolve_model_dir
        directory = resolve_model_dir(directory)
        config = ModelConfig.load(directory / "config.json")
        state = hf.read_state_dict(directory, config)
        if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
            # transformers drops the MTP module when it saves; load the main model without it
            config = config.replace(num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = cls(config)
        hf.check_state_dict(state, model.state_dict(), directory)
        target = dtype or torch.float32
        for k, v in state.items():
            keep_fp32 = k.endswith(hf.FP32_TENSORS) or not v.is_floating_point()
            state[k] = v.to(torch.float32 if keep_fp32 else target)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary = RotaryEmbedding(config)  # the RoPE table is not in the state dict: build it off the meta device
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        """Write config.json + safetensors under the Hugging Face names (each file atomically)."""
        hf.write_pretrained(self.state_dict(), self.config, directory, max_shard_bytes=max_shard_bytes)
