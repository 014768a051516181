"""The PPO baseline GRPO replaces (DeepSeekMath arXiv:2402.03300 §4.1, eq. 1–2), for side-by-side measurement.

A critic of the policy's size (a copy of its transformer with a scalar value head, own optimizer) estimates
V(s_t); the per-token reward is the KL penalty −β log(π_old/π_ref) plus the task reward on the last token;
advantages come from GAE(γ, λ), whitened over the batch; the policy takes the clipped token surrogate and the
critic the clipped value loss. Rollouts, rewards and checkpoints are GRPO's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, fields

import torch
from torch import nn

from nanoseek.policy import Batch, Policy
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, _average_gradients, _reduce, grpo_loss, train_grpo


@dataclass
class PPOConfig(GRPOConfig):
    num_generations: int = 1  # completions per prompt (PPO needs no group)
    beta: float = 0.04  # KL coefficient in the reward
    gamma: float = 1.0
    lam: float = 0.95
    critic_lr: float = 1e-5
    cliprange_value: float = 0.2
    whiten_advantages: bool = True

    def validate(self) -> None:
        generations = self.num_generations
        self.num_generations = max(generations, 2)  # GRPO's group rule does not apply here
        try:
            super().validate()
        finally:
            self.num_generations = generations
        if generations < 1 or not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1 or self.critic_lr <= 0:
            raise ValueError("PPOConfig: need num_generations >= 1, 0 <= lam <= 1, 0 < gamma <= 1, critic_lr > 0")
        if self.process_reward is not None:
            raise ValueError("PPOConfig.process_reward: process supervision is GRPO's (nanoseek grpo); PPO uses GAE")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens (right-padded; V after the last token is 0).

    rewards, values, mask: (B, L) -> (advantages, returns) (B, L): δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}.
    """
    B, L = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(L)):
        next_v = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (x - mean) / (var.sqrt() + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss ½ max((V − R)², (clip(V, V_old ± ε) − R)²), token mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp(min=1.0)


class Critic(nn.Module):
    """V(s_t): a copy of the policy's transformer (its vocabulary head dropped) with a scalar value head."""

    def __init__(self, policy: Policy):
        super().__init__()
        if policy.is_nanoseek:
            self.backbone = copy.deepcopy(policy.model)
            self.backbone.lm_head, self.backbone.mtp = nn.Identity(), nn.ModuleList()
            width = policy.model.config.hidden_size
        else:
            self.backbone = copy.deepcopy(policy.model.get_decoder())
            width = policy.model.config.hidden_size
        self.is_nanoseek = policy.is_nanoseek
        self.value_head = nn.Linear(width, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Values of the states before each completion token: (B, L)."""
        if self.is_nanoseek:
            h = self.backbone(batch.input_ids, return_hidden=True)
        else:
            h = self.backbone(input_ids=batch.input_ids).last_hidden_state
        L = batch.completion_ids.shape[1]
        pos = (batch.prompt_lens[:, None] - 1 + torch.arange(L, device=h.device)).clamp(max=h.shape[1] - 1)
        h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, D)
        return self.value_head(h).squeeze(-1).float() * batch.completion_mask


class PPOTrainer(GRPOTrainer):
    kind = "ppo"

    def __init__(self, cfg: PPOConfig, policy: Policy, tokenizer, rank: int = 0, world: int = 1):
        super().__init__(cfg, policy, tokenizer, rank, world)
        self.critic = Critic(policy).to(policy.device)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.99))

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "critic": self.critic.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        if "critic" not in state:
            raise ValueError("this checkpoint has no critic: it was not written by PPO (or by an older nanoseek); "
                             "start the PPO run again without --resume")
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rewards)  # PPO's advantages are per token, from GAE (below)

    def step(self, step: int) -> tuple[dict, list]:
        cfg, model = self.cfg, self.policy.model
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:  # the policy's schedule; the critic keeps critic_lr
            g["lr"] = self.lr_at(step)
        rollout, info, samples = self.collect(step)
        t_gen = time.perf_counter() - t0
        model.train()
        self.critic.train()
        sums = dict.fromkeys(("kl", "clip_low", "clip_high", "tokens", "entropy", "loss", "value_loss"), 0.0)
        grad_norms = []
        n = len(rollout.batch) if rollout is not None else 0
        if n:
            batch = rollout.batch
            mask = batch.completion_mask
            old_logp = self.logprobs(self.policy, batch)
            ref_logp = self.logprobs(self.ref, batch) if self.ref is not None else old_logp
            with torch.no_grad():
                old_values = torch.cat([self.critic(batch.select(r).to(self.policy.device)).cpu()
                                        for r in self.micro_batches(torch.arange(n))])
            kl = (old_logp - ref_logp) * mask  # k1 estimate in the reward (eq. 2)
            token_rewards = -cfg.beta * kl
            last = (mask.sum(1).long() - 1).clamp(min=0)
            token_rewards[torch.arange(n), last] += rollout.rewards * (mask.sum(1) > 0)
            adv, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, mask)
            sums["kl"] = float(kl.sum())
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _ in range(cfg.num_iterations):
            order = torch.randperm(n, generator=gen)
            for mini in order.tensor_split(cfg.num_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                self.critic_optimizer.zero_grad(set_to_none=True)
                micro = self.micro_batches(mini) if len(mini) else []
                for rows in micro:
                    sub = batch.select(rows).to(self.policy.device)
                    dev = sub.input_ids.device
                    logp, ent = self.policy.completion_logprobs(sub, temperature=cfg.temperature,
                                                                chunk_tokens=cfg.logp_chunk_tokens, entropy=True)
                    loss, st = grpo_loss(logp, old_logp[rows].to(dev), adv[rows].to(dev), sub.completion_mask,
                                         epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type="bnpo")
                    v_loss = value_loss(self.critic(sub), old_values[rows].to(dev), returns[rows].to(dev),
                                        sub.completion_mask, cfg.cliprange_value)
                    ((loss + v_loss) / len(micro)).backward()
                    for k in ("clip_low", "clip_high", "tokens"):
                        sums[k] += float(st[k])
                    sums["entropy"] += float((ent * sub.completion_mask).sum())
                    sums["loss"] += float(loss.detach()) * len(rows) / n
                    sums["value_loss"] += float(v_loss.detach()) * len(rows) / n
                _average_gradients(model, self.world)
                _average_gradients(self.critic, self.world)
                grad_norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.critic_optimizer.step()
        sums["kl"] *= cfg.num_iterations  # metrics() divides the KL sum by the tokens of every pass
        m = self.metrics(step, info, sums, grad_norms, time.perf_counter() - t0, t_gen)
        m["value_loss"] = _reduce([sums["value_loss"]])[0] / self.world / cfg.num_iterations
        return m, samples


def train_ppo(cfg: PPOConfig) -> dict:
    """The PPO baseline, run by GRPO's loop (metrics.jsonl, checkpoints with the critic, exact ``--resume``)."""
    return train_grpo(cfg, PPOTrainer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.train.grpo import add_arguments as grpo_arguments

    grpo_arguments(parser)
    parser.set_defaults(num_generations=1, beta=0.04, out="runs/ppo")
    a = parser.add_argument
    a("--gamma", type=float, default=1.0, help="GAE discount γ")
    a("--lam", type=float, default=0.95, help="GAE λ")
    a("--critic-lr", type=float, default=1e-5)
    a("--cliprange-value", type=float, default=0.2)
    a("--no-whiten-advantages", dest="whiten_advantages", action="store_false")


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(PPOConfig)}
    summary = train_ppo(PPOConfig(**{k: v for k, v in vars(args).items() if k in names}))
    print(json.dumps(summary))
    return 0
