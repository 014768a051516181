"""The PPO baseline GRPO replaces (DeepSeekMath arXiv:2402.03300 §4.1, eq. 1–2): a critic estimates V(s_t); the
per-token reward is the KL penalty −β log(π_old/π_ref) plus the task reward on the last token; advantages come from
GAE(γ, λ), whitened; the policy takes the clipped token surrogate and the critic the clipped value loss."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from nanoseek import cli_args
from nanoseek.cli_args import option
from nanoseek.policy import Batch, Policy
from nanoseek.rollout import Rollout, Sampling
from nanoseek.train.losses import Clip, gae, grpo_loss, value_loss, whiten
from nanoseek.train.optimize import MicroBatch, OptimizeConfig, OptimizeStats, per_token, rollout_logprobs
from nanoseek.train.rl import RLConfig, train_rl


@dataclass(frozen=True, kw_only=True)
class PPOParams(Clip):
    """Every setting that changes PPO's advantages, losses and critic."""

    beta: float = option(0.04, "KL coefficient β of the per-token KL penalty in the reward", min=0)
    gamma: float = option(1.0, "GAE discount γ", gt=0, max=1)
    lam: float = option(0.95, "GAE λ", min=0, max=1)
    critic_lr: float = option(1e-5, "critic learning rate", gt=0)
    cliprange_value: float = option(0.2, "clip range of the value loss", gt=0)
    whiten_advantages: bool = option(True, "whiten advantages over the batch")


@dataclass(frozen=True, kw_only=True)
class PPOConfig(RLConfig, PPOParams):
    """``nanoseek ppo``: the shared RL flags and PPO's own."""

    num_generations: int = option(1, "completions per prompt (PPO needs no group)", min=1)


class Critic(nn.Module):
    """V(s_t): a copy of the policy's transformer (no vocabulary head, no MTP) with a scalar value head."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.backbone = policy.hidden_copy()
        self.states = Policy(self.backbone, policy.pad_id, policy.eos_id, policy.share_prompts)
        self.value_head = nn.Linear(policy.model.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Values of the states before each completion token: (B, L)."""
        return self.value_head(self.states.completion_states(batch)).squeeze(-1).float() * batch.completion_mask


class PPO:
    kind, Params = "ppo", PPOParams

    def __init__(self, cfg: PPOParams, sampling: Sampling, optim: OptimizeConfig, policy: Policy):
        self.cfg, self.optim, self.policy = cfg, optim, policy
        self.ref = policy.copy() if cfg.beta > 0 else None
        self.critic = Critic(policy).to(policy.device)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.99))
        self.trainables = [(self.critic, self.critic_optimizer)]  # trained beside the policy

    def prepare(self, rollout: Rollout, step: int, stats: OptimizeStats) -> Rollout:
        cfg, batch, mask = self.cfg, rollout.batch, rollout.batch.completion_mask
        old = rollout_logprobs(self.policy, batch, self.optim, stats)
        ref = rollout_logprobs(self.ref, batch, self.optim, stats) if self.ref is not None else old
        values = per_token(self.critic, self.critic.states, batch, self.optim.micro_batch_size, stats)
        kl = (old - ref) * mask  # k1 estimate in the reward (eq. 2)
        token_rewards = -cfg.beta * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)
        token_rewards[torch.arange(len(rollout)), last] += rollout.rewards * (mask.sum(1) > 0)
        adv, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask) if cfg.whiten_advantages else adv
        return replace(rollout, advantages=adv, old_logp=old, extras={"values": values, "returns": returns, "kl": kl})

    def loss(self, rollout: Rollout, mb: MicroBatch, logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mask = mb.batch.completion_mask
        loss, st = grpo_loss(logp, mb.take(rollout.old_logp), mb.take(rollout.advantages), mask,
                             epsilon_low=self.cfg.epsilon, epsilon_high=self.cfg.epsilon_high, loss_type="bnpo",
                             num_items=mb.num_tokens)
        v_loss = value_loss(self.critic(mb.batch), mb.take(rollout.extras["values"]),
                            mb.take(rollout.extras["returns"]), mask, self.cfg.cliprange_value, mb.num_tokens)
        # the statistics the trainer sums: the reward's KL term per token, and the value loss weighted by rows
        st.update(kl=mb.take(rollout.extras["kl"]).sum(), value_loss=v_loss.detach() * mb.num_rows / len(rollout))
        return loss + v_loss, st

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])


def train_ppo(cfg: PPOConfig) -> dict:
    return train_rl(cfg, PPO)


add_arguments, run = cli_args.subcommand(PPOConfig, train_ppo)
