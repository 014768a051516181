"""Preallocated per-layer KV caches with per-sequence lengths (ragged batches), written in place. MLA caches only
the normed latent c_KV (d_c) and the shared RoPE key k_R (d_R) per token and layer (DeepSeek-V2 §2.1.2, eq. 9-10) as
[c_KV | k_R], scored in one pass by the absorbed decode (vLLM's layout); MHA/GQA caches full keys and values."""

from __future__ import annotations

import copy

import torch


class KVCache:
    """``buffers[name][layer]: (B, T_max, width)``; ``lengths: (B,)`` tokens cached per sequence. One tensor per
    layer, so a forward under autograd (``nanoseek.policy``'s shared prompts) can write layer l + 1 without
    invalidating the views layer l saved for backward. ``layer_offset``: the first block served (MTP's own cache)."""

    def __init__(self, widths: dict[str, int], num_layers: int, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", layer_offset: int = 0):
        self.max_len, self.layer_offset = max_len, layer_offset
        self.buffers = {name: [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)
                               for _ in range(num_layers)] for name, width in widths.items()}
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layers in self.buffers.values() for b in layers)

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, measured from the allocated tensors."""
        return self.nbytes // (self.lengths.shape[0] * self.max_len)

    def write(self, layer_idx: int, positions: torch.Tensor, **values: torch.Tensor) -> None:
        """Store ``values[name]: (B, T, width)`` at ``positions: (B, T)`` of layer ``layer_idx``."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        for name, value in values.items():
            self.buffers[name][layer_idx - self.layer_offset].index_put_((rows, positions), value)

    def read(self, layer_idx: int, name: str, length: int) -> torch.Tensor:
        """The first ``length`` slots of every sequence: (B, length, width), a view (no copy)."""
        return self.buffers[name][layer_idx - self.layer_offset][:, :length]

    def view(self, start: int, stop: int) -> KVCache:
        """Sequences ``start:stop`` as a cache sharing this one's storage (a forward on it writes here)."""
        view = copy.copy(self)
        view.buffers = {name: [b[start:stop] for b in layers] for name, layers in self.buffers.items()}
        view.lengths = self.lengths[start:stop]
        return view

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Copy sequences ``src`` (tokens, lengths) into rows ``dst``, all read before any write (so it can swap)."""
        n = int(self.lengths[src].max())
        for b in [b for layers in self.buffers.values() for b in layers]:
            b[dst, :n] = b[src, :n]
        self.lengths[dst] = self.lengths[src]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the sequences ``rows: (B',)`` (batch indices)."""
        self.buffers = {name: [b[rows] for b in layers] for name, layers in self.buffers.items()}
        self.lengths = self.lengths[rows].clone()


def cache_widths(config) -> dict[str, int]:
    """What one token stores per layer: MLA {latent: [c_KV | k_R], d_c + d_R}; MHA/GQA {k, v: n_kv·d_h}."""
    if config.attention_type == "mla":
        return {"latent": config.kv_lora_rank + config.qk_rope_head_dim}
    return dict.fromkeys(("k", "v"), config.num_key_value_heads * config.head_dim)


def elements_per_token(config) -> int:
    """Cache elements one token takes over all layers: MLA (d_c + d_R)·L, MHA/GQA 2·n_kv·d_h·L."""
    return sum(cache_widths(config).values()) * config.num_hidden_layers
