"""DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeekMoE §3, V2 §2.2, V3 §2.1.2).
h' = u + Σ_shared FFN_s(u) + Σ_routed g_i FFN_i(u)   (V3 eq. 12)
Gates: softmax with greedy or group-limited greedy top-k (V2), sigmoid with a selection-only correction bias and
group-limited top-k (V3 "noaux_tc"). The bias b_i changes which experts are chosen, never the gate values g_i, which
come from the raw affinities (V3 eq. 16). Experts run grouped: tokens sorted by expert, no per-token Python loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: affinities s = σ(u·e) or softmax(u·e), top-k selection, gate values g (float32 throughout)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.norm_topk_prob, self.route_scale = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size, dtype=torch.float32))
        # b_i: used only to choose experts (aux-loss-free balancing); updated outside autograd
        bias = torch.zeros(self.n_experts, dtype=torch.float32) if self.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> gate values (N, K), expert ids (N, K), raw affinities s (N, E)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            # V3: the sum of each group's top-2 experts; V2: each group's best expert
            group_score = (grouped.topk(2, dim=-1).values.sum(dim=-1) if self.topk_method == "noaux_tc"
                           else grouped.amax(dim=-1))
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.n_experts)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)  # g'_i from the raw affinities: the bias never reaches them
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids, scores


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_proj/up_proj (E, I, D), down_proj (E, D, I)."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, D), ids/weights: (N, K) -> (N, D) and tokens per expert (E,)."""
        (N, K), (E, I, D) = ids.shape, self.gate_proj.shape
        counts = torch.bincount(ids.flatten(), minlength=E)
        if N * (E - K) * D * I <= DENSE_MACS_PER_EXPERT * E:  # a few tokens (decode): every expert, 3 batched matmuls
            return self.forward_dense(x, ids, weights), counts
        order = ids.flatten().argsort(stable=True)  # (N·K,) token-slots sorted by expert
        token_of_slot = order // K
        xs = x.index_select(0, token_of_slot)  # (N·K, D), grouped by expert
        if xs.dtype == self.gate_proj.dtype and grouped_mm_supported(xs.device, xs.dtype):  # one kernel for all
            offs = counts.cumsum(0).to(torch.int32)  # end of each expert's slice
            h = F.silu(F.grouped_mm(xs, self.gate_proj.mT, offs=offs)) * F.grouped_mm(xs, self.up_proj.mT, offs=offs)
            ys = F.grouped_mm(h, self.down_proj.mT, offs=offs)
        else:
            # split/unbind once: indexing per expert would make autograd build a full-size zero gradient for
            # every expert (O(E^2) memory traffic); split's and unbind's backward concatenate/stack them once
            w_gate, w_up, w_down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
            ys = torch.cat([(F.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T)) @ w_down[e].T
                            for e, xe in enumerate(xs.split(counts.tolist()))])
        ys = ys * weights.flatten().index_select(0, order)[:, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys), counts

    def forward_dense(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, gate-weighted (0: not chosen): E/K× the arithmetic in 3 matmuls, not 3·E."""
        E = self.gate_proj.shape[0]
        xe = x.expand(E, *x.shape)  # (E, N, D)
        h = F.silu(torch.bmm(xe, self.gate_proj.mT)) * torch.bmm(xe, self.up_proj.mT)  # (E, N, I)
        y = torch.bmm(h, self.down_proj.mT)  # (E, N, D)
        gate = x.new_zeros(x.shape[0], E).scatter_(1, ids, weights.to(x.dtype))  # (N, E)
        return (y * gate.T[..., None]).sum(0)


# Multiply-adds that cost about as much as one small matmul call on a CPU core (~20 µs at ~50 GFLOP/s): the dense
# path runs when its extra work, N·(E−K)·D·I, is below this per expert call it saves. For a 256-wide model with
# 8 experts of width 32 that is decode batches up to ~80 tokens; at DeepSeek-V3's sizes, never.
DENSE_MACS_PER_EXPERT = 500_000


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm (torch >= 2.10) has a kernel: fp32/bf16 on CPU, bf16 on CUDA sm90+ (Hopper, Blackwell)."""
    on_cpu = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    on_cuda = device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return hasattr(F, "grouped_mm") and (on_cpu or on_cuda)


@dataclass
class RouterStats:
    """One forward's router statistics per MoE layer, in forward order (main, then MTP): load[layer_idx]: (E,) tokens
    per expert; balance_loss[layer_idx]: Σ_i f_i P_i (V3 eq. 17-20, before α), only when ``balance`` is set."""

    balance: bool = False
    load: dict[int, torch.Tensor] = field(default_factory=dict)
    balance_loss: dict[int, torch.Tensor] = field(default_factory=dict)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # the key of this layer's entries in RouterStats
        self.top_k = config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, router_stats: RouterStats | None = None) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, ids, scores = self.gate(flat)
        routed, counts = self.experts(flat, ids, weights)
        if router_stats is not None:
            router_stats.load[self.layer_idx] = counts.detach().float()
            if router_stats.balance:
                router_stats.balance_loss[self.layer_idx] = sequence_balance_loss(scores.view(B, T, -1), self.top_k)
        out = routed.view(B, T, D)
        return out if self.shared_experts is None else out + self.shared_experts(x)


def sequence_balance_loss(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """V3 eq. 17-20, without α: Σ_i f_i P_i averaged over sequences. scores: (B, T, E) raw affinities;
    f_i = E/(K·T) Σ_t 1(s_i,t ∈ TopK(s_t)); P_i = 1/T Σ_t s_i,t / Σ_j s_j,t."""
    B, T, E = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
    f = chosen.sum(dim=1) * (E / (top_k * T))  # (B, E), no gradient
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=-1).mean()


@torch.no_grad()
def update_expert_bias(gate: Gate, load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing (V3 §2.1.2) after the step: b_i += γ·sign(mean_load − load_i); load: global batch."""
    if gate.e_score_correction_bias is not None and gamma != 0:
        gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
