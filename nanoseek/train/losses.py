"""The RL math of GRPO and its variants (DeepSeekMath arXiv:2402.03300 §4.1, eq. 3–4) and of PPO (eq. 1–2: GAE,
whitening, the clipped value loss) as pure functions (no model, optimizer or process group), and GRPO's flags."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.cli_args import option

ALIASES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "constant": "dr_grpo"}
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", *ALIASES)


@dataclass(frozen=True, kw_only=True)
class Clip:
    """The clipped surrogate's range (DeepSeekMath eq. 3; DAPO's clip-higher)."""

    epsilon: float = option(0.2, "clip range ε (ε_low)", gt=0)
    epsilon_high: float | None = option(None, "clip-higher ε_high (default ε)", gt=0)


@dataclass(frozen=True, kw_only=True)
class GRPOParams(Clip):
    """Every setting that changes GRPO's advantages and loss (with the sampling's G and length cap)."""

    beta: float = option(0.0, "KL coefficient β (> 0 keeps a frozen reference model)", min=0)
    ref_reset_every: int = option(0, "copy the policy into the reference every N steps (0: never)", min=0)
    loss_type: str = option("grpo", "loss aggregation", choices=LOSS_TYPES)
    scale_rewards: str = option("group", "std dividing advantages (none: Dr. GRPO)", choices=("group", "batch", "none"))
    rloo: bool = option(False, "leave-one-out baseline")
    advantage_eps: float = option(1e-4, "ε added to the std that scales advantages", gt=0)
    importance_sampling_level: str = option("token", "importance ratio (sequence: GSPO)", choices=("token", "sequence"))
    mask_truncated_completions: bool = option(False, "no loss on completions that hit the length cap")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty buffer L_cache (0: off)", min=0)
    overlong_penalty: float = option(1.0, "DAPO soft overlong penalty at the length cap", min=0)

    @property
    def aggregation(self) -> str:
        """``loss_type`` with TRL's older names resolved."""
        return ALIASES.get(self.loss_type, self.loss_type)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group", rloo: bool = False,
                     eps: float = 1e-4, batch_std: float | None = None) -> torch.Tensor:
    """Outcome supervision (§4.1.2): rewards (N,) in contiguous groups of G -> Â_i = (r_i − b_i) / (σ + eps), (N,).
    b_i: the group mean, or with ``rloo`` the mean of the other G−1 (RLOO); σ: the unbiased group std, the batch std
    (``batch_std``, e.g. over every rank, else this batch's) or 1 for ``scale="none"`` (Dr. GRPO)."""
    G = num_generations
    if rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={G}")
    r = rewards.view(-1, G).double()
    adv = r - ((r.sum(1, keepdim=True) - r) / (G - 1) if rloo else r.mean(1, keepdim=True))
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((_std(r) if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return adv.view(-1).to(rewards.dtype)


def _std(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], num_generations: int, length: int,
                       eps: float = 1e-4, scale: str = "group", batch_std: float | None = None) -> torch.Tensor:
    """Process supervision (DeepSeekMath §4.1.3) -> per-token advantages (N, length). Step j of completion i scores
    ``step_rewards[i][j]`` and ends at completion position ``step_ends[i][j]``; r̃ = (r − mean(R)) / (std(R) + eps)
    over the steps R of a group (``scale`` as in ``group_advantages``), and Â_{i,t} = Σ_{j: index(j) ≥ t}
    r̃_i^{index(j)}. A completion without steps gets 0."""
    G = num_generations
    adv = torch.zeros(len(step_rewards), length, dtype=torch.float64)
    if batch_std is None:
        batch_std = _std(torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float64))
    for g in range(0, len(step_rewards), G):
        group = torch.tensor([r for rs in step_rewards[g : g + G] for r in rs], dtype=torch.float64)
        mean = float(group.mean()) if group.numel() else 0.0
        std = {"group": _std(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        for i in range(g, g + G):
            for r, end in zip(step_rewards[i], step_ends[i]):
                if not 0 <= end < length:
                    raise ValueError(f"completion {i}: step end {end} outside the completion (length {length})")
                adv[i, end] += (r - mean) / std
    return adv.flip(1).cumsum(1).flip(1).float()


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO (arXiv:2503.14476) eq. 13: 0 up to max_len − buffer, then linear to −factor at max_len and beyond."""
    return -factor * ((lengths.float() - (max_len - buffer)) / buffer).clamp(0.0, 1.0)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items: float | None = None,
              num_rows: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + β·k3 KL (DeepSeekMath eq. 3–4), aggregated by ``loss_type`` -> (loss, statistics).
    logp, old_logp, ref_logp, mask: (B, L); advantages: (B,) or (B, L) (process supervision). Per token:
    ℓ = −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â) + β (exp(ref−logp) − (ref−logp) − 1), ρ = π/π_old, or at the sequence
    level GSPO-token's (arXiv:2507.18071) ρ_{i,t} = sg[s_i]·π_t/sg[π_t], s_i = exp(masked mean token log-ratio):
    GSPO exactly for one advantage per sequence (else each token keeps its own). Normalizers: ``num_rows`` (default
    B) for "grpo" and "dr_grpo", ``num_items`` (default: active tokens) for "bnpo" and "dapo", ``max_completion_length``
    (default L) for "dr_grpo". Statistics (detached masked sums): kl, clip_low, clip_high, tokens."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    loss_type = ALIASES.get(loss_type, loss_type)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    log_w = logp - old_logp  # log ρ per token
    if importance_sampling_level == "sequence":
        seq = ((log_w * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # log s_i: (B, 1)
        log_w = seq.detach() + logp - logp.detach()  # GSPO-token: value log s_i, gradient ∇log π_t
    ratio = torch.exp(log_w)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)  # (B, L)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3, DeepSeekMath eq. 4
        per_token = per_token + beta * kl
    per_token = per_token * mask
    rows = mask.shape[0] if num_rows is None else num_rows
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(rows, 1)
    elif loss_type in ("bnpo", "dapo"):
        loss = per_token.sum() / max(float(mask.sum() if num_items is None else num_items), 1.0)
    else:  # dr_grpo
        loss = per_token.sum() / (max(rows, 1) * (max_completion_length or mask.shape[1]))
    with torch.no_grad():
        low, high = (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)
        return loss, {"clip_low": (low * mask).sum(), "clip_high": (high * mask).sum(), "tokens": mask.sum(),
                      "kl": (kl.detach() * mask).sum() if kl is not None else mask.new_zeros(())}


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over right-padded completion tokens (V after the last is 0): rewards, values, mask (B, L) -> (advantages,
    returns) (B, L), δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}."""
    values = values * mask
    delta = rewards + gamma * torch.cat((values[:, 1:], torch.zeros_like(values[:, :1])), 1) - values
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        adv[:, t] = last = (delta[:, t] + gamma * lam * last) * mask[:, t]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (x - mean) / (var.sqrt() + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, num_items: float | None = None) -> torch.Tensor:
    """Clipped value loss ½ max((V − R)², (clip(V, V_old ± ε) − R)²) summed / ``num_items`` (default ``mask.sum()``)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / max(float(mask.sum() if num_items is None else num_items), 1.0)


