"""GRPO (DeepSeekMath arXiv:2402.03300 §4, eq. 3) and its variants (``GRPOParams``, each switch independent of the
others: RLOO, Dr. GRPO, process supervision, BNPO / DAPO aggregation, clip-higher, GSPO, DAPO's dynamic sampling)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from nanoseek import cli_args
from nanoseek.cli_args import option
from nanoseek.distributed import global_std
from nanoseek.policy import Policy
from nanoseek.rewards import PROCESS_REWARD_FNS
from nanoseek.rollout import Rollout, Sampling
from nanoseek.train.losses import GRPOParams, group_advantages, grpo_loss, process_advantages, soft_overlong_penalty
from nanoseek.train.optimize import MicroBatch, OptimizeConfig, OptimizeStats, rollout_logprobs
from nanoseek.train.rl import RLConfig, train_rl


@dataclass(frozen=True, kw_only=True)
class GRPOConfig(RLConfig, GRPOParams):
    """``nanoseek grpo``: the shared RL flags and GRPO's own."""

    num_generations: int = option(8, "G completions per prompt (a group)", min=2)
    # in Python also a callable fn(prompts, completions, completion_ids, **columns) -> list[StepRewards | None]
    process_reward: str | Callable | None = option(None, "process supervision by step rewards (built-in: arithmetic)")
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards are all equal and resample")
    max_resample_rounds: int = option(3, "dynamic sampling: most extra sampling rounds per step", min=0)

    def validate(self) -> None:
        super().validate()
        if self.overlong_buffer > self.max_completion_length:
            raise ValueError(f"--overlong-buffer {self.overlong_buffer}: must be <= --max-completion-length "
                             f"{self.max_completion_length} (0 disables the soft penalty)")
        if self.process_reward is not None:
            if not callable(self.process_reward) and self.process_reward not in PROCESS_REWARD_FNS:
                raise ValueError(f"--process-reward {self.process_reward!r}: give a built-in name "
                                 f"({', '.join(sorted(PROCESS_REWARD_FNS))}) or, in Python, a callable")
            if self.rloo:
                raise ValueError("--rloo needs one reward per completion; drop --rloo or --process-reward")
            if self.overlong_buffer:
                raise ValueError("--overlong-buffer: not with --process-reward (use --mask-truncated-completions)")


class GRPO:
    """Group-relative advantages and the clipped surrogate; the reference model when β > 0."""

    kind, Params = "grpo", GRPOParams
    trainables = ()  # (module, optimizer) pairs trained beside the policy: none

    def __init__(self, cfg: GRPOParams, sampling: Sampling, optim: OptimizeConfig, policy: Policy):
        self.cfg, self.sampling, self.optim, self.policy = cfg, sampling, optim, policy
        self.ref = policy.copy() if cfg.beta > 0 else None

    def prepare(self, rollout: Rollout, step: int, stats: OptimizeStats) -> Rollout:
        cfg, S, opt = self.cfg, self.sampling, self.optim
        if self.ref is not None and cfg.ref_reset_every and step > 1 and (step - 1) % cfg.ref_reset_every == 0:
            self.ref.model.load_state_dict(self.policy.model.state_dict())
        rewards = rollout.rewards
        if cfg.overlong_buffer and len(rollout):
            rewards = rewards + soft_overlong_penalty(rollout.batch.completion_lens, S.max_completion_length,
                                                      cfg.overlong_buffer, cfg.overlong_penalty)
        by_batch = cfg.scale_rewards == "batch"  # the std over every rank's rewards (or step rewards)
        if rollout.steps is not None:
            rs = [s.rewards if s is not None else [] for s in rollout.steps]
            es = [s.ends if s is not None else [] for s in rollout.steps]
            std = global_std(torch.tensor([x for xs in rs for x in xs], dtype=torch.float64)) if by_batch else None
            adv = process_advantages(rs, es, S.num_generations, rollout.batch.completion_ids.shape[1],
                                     cfg.advantage_eps, cfg.scale_rewards, std)
        else:
            std = global_std(rewards) if by_batch else None
            adv = group_advantages(rewards, S.num_generations, cfg.scale_rewards, cfg.rloo, cfg.advantage_eps, std) \
                if len(rewards) else torch.zeros(0)
        mask = rollout.batch.completion_mask * (~rollout.truncated)[:, None] if cfg.mask_truncated_completions else None
        old = None if opt.num_iterations == opt.num_minibatches == 1 else \
            rollout_logprobs(self.policy, rollout.batch, opt, stats)  # else π_old = π: ratio 1, no pass
        ref = rollout_logprobs(self.ref, rollout.batch, opt, stats) if self.ref is not None else None
        return replace(rollout, rewards=rewards, advantages=adv, loss_mask=mask, old_logp=old, ref_logp=ref)

    def loss(self, rollout: Rollout, mb: MicroBatch, logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        old = logp.detach() if rollout.old_logp is None else mb.take(rollout.old_logp)
        return grpo_loss(logp, old, mb.take(rollout.advantages), mb.take(rollout.mask), beta=cfg.beta,
                         ref_logp=None if rollout.ref_logp is None else mb.take(rollout.ref_logp),
                         epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.aggregation,
                         importance_sampling_level=cfg.importance_sampling_level,
                         max_completion_length=self.sampling.max_completion_length, num_rows=mb.num_rows,
                         num_items=mb.global_tokens if cfg.aggregation == "dapo" else mb.num_tokens)

    def state_dict(self) -> dict:
        return {"ref": self.ref.model.state_dict()} if self.ref is not None and self.cfg.ref_reset_every else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ref is not None and "ref" in state:
            self.ref.model.load_state_dict(state["ref"])


def train_grpo(cfg: GRPOConfig) -> dict:
    return train_rl(cfg, GRPO)


add_arguments, run = cli_args.subcommand(GRPOConfig, train_grpo)
