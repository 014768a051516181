"""GRPO (DeepSeekMath arXiv:2402.03300 §4, eq. 3) and its variants: Dr. GRPO, DAPO, GSPO, RLOO.

Per step: P prompts × G completions from π_old, rewards, group-relative advantages, then μ passes over the
rollout in mini-batches with the clipped surrogate and the k3 KL to π_ref in the loss. Every switch is
independent of the others:

- advantage: baseline group mean or leave-one-out (``rloo``); scale by group std, batch std or not at all
  (``scale_rewards`` "group" | "batch" | "none" = Dr. GRPO). Process supervision (``process_reward``): per-step
  rewards at token positions (``nanoseek.rewards.process``) give per-token advantages via ``process_advantages``.
- aggregation (``loss_type``, TRL's names): "grpo" = seq-mean-token-mean, "bnpo" = token-mean over the
  micro-batch, "dapo" = token-mean over the whole rollout's tokens, "dr_grpo" = constant sum / (B · max_len).
- clip range ``epsilon`` / ``epsilon_high`` (clip-higher); ``importance_sampling_level`` "token" | "sequence" (GSPO).
- ``beta`` > 0 loads a reference model; ``ref_reset_every`` N copies the policy into it every N steps.
- DAPO dynamic sampling (drop all-equal groups, resample up to a cap) and overlong handling (mask truncated
  completions, or the soft length penalty of DAPO eq. 13).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.policy import Batch, Policy

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "constant"}
ALIASES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "constant": "dr_grpo"}
LR_SCHEDULES = ("constant", "linear", "cosine")


# ---------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group", rloo: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards: (N,) grouped contiguously by G -> advantages (N,).

    Â_i = (r_i − b_i) / (σ + eps): b_i the group mean (DeepSeekMath outcome supervision) or, with ``rloo``, the mean
    of the other G−1 rewards; σ the group std, the batch std, or 1 for ``scale="none"`` (Dr. GRPO). Std is the
    unbiased one, as in TRL. An all-equal group gets exactly 0.
    """
    G = num_generations
    if rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={G}")
    if G < 2:
        raise ValueError("num_generations must be >= 2 for a group baseline")
    r = rewards.view(-1, G).double()
    baseline = (r.sum(1, keepdim=True) - r) / (G - 1) if rloo else r.mean(1, keepdim=True)
    adv = r - baseline
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((r.std() if r.numel() > 1 else r.new_zeros(())) + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return adv.view(-1).to(rewards.dtype)


def _std(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], num_generations: int,
                       length: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """Process supervision (DeepSeekMath §4.1.3) -> per-token advantages (N, length).

    ``step_rewards[i][j]`` scores step j of completion i, whose last token is completion position
    ``step_ends[i][j]``. Rewards are normalized over all steps R of all G outputs of a group,
    r̃ = (r − mean(R)) / (std(R) + eps), and Â_{i,t} = Σ_{j: index(j) ≥ t} r̃_i^{index(j)}. ``scale`` "batch" takes
    the std over every step given, "none" (Dr. GRPO) divides by nothing. A completion without steps gets 0.
    """
    G = num_generations
    if len(step_rewards) != len(step_ends) or len(step_rewards) % G:
        raise ValueError("step_rewards and step_ends need one list per completion, grouped by num_generations")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    adv = torch.zeros(len(step_rewards), length, dtype=torch.float64)
    batch_std = _std(torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float64))
    for g in range(0, len(step_rewards), G):
        group = torch.tensor([r for rs in step_rewards[g : g + G] for r in rs], dtype=torch.float64)
        mean = float(group.mean()) if group.numel() else 0.0
        std = {"group": _std(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        for i in range(g, g + G):
            if len(step_rewards[i]) != len(step_ends[i]):
                raise ValueError(f"completion {i}: {len(step_rewards[i])} step rewards but {len(step_ends[i])} ends")
            for r, end in zip(step_rewards[i], step_ends[i]):
                if not 0 <= end < length:
                    raise ValueError(f"completion {i}: step end {end} outside the completion (length {length})")
                adv[i, end] += (r - mean) / std
    return adv.flip(1).cumsum(1).flip(1).float()  # Â_t = Σ over steps ending at or after t


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13: 0 up to max_len − buffer, then linear down to −factor at max_len (and −factor beyond)."""
    start = max_len - buffer
    return -factor * ((lengths.float() - start) / buffer).clamp(0.0, 1.0)


# ---------------------------------------------------------------------- the loss
def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items: float | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + β·k3 KL, aggregated by ``loss_type``. Returns (loss, statistics).

    logp, old_logp, ref_logp, mask: (B, L); advantages: (B,) or (B, L) (process supervision).
    Per token: ℓ = −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â) + β (exp(ref−logp) − (ref−logp) − 1), with ρ the token
    ratio π/π_old or, at the sequence level, GSPO-token's (arXiv:2507.18071) ρ_{i,t} = sg[s_i]·π_t/sg[π_t],
    s_i = exp of the masked mean token log-ratio: the value s_i on every token, the gradient of the token's own
    log-prob. With one advantage per sequence this is GSPO exactly (same loss and gradient); with per-token
    advantages each token keeps its own (a bare (B, 1) ratio would credit every token with the sequence's mean
    advantage instead). ``num_items`` is the "dapo" normalizer (active tokens of the whole rollout, per optimizer
    step; default this batch's), and ``max_completion_length`` the "dr_grpo" constant (default L).
    Statistics (detached sums over masked tokens): kl, clip_low, clip_high, tokens.
    """
    loss_type = ALIASES.get(loss_type, loss_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES) + sorted(ALIASES)}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = logp - old_logp
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        seq = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # log s_i: (B, 1)
        log_w = seq.detach() + logp - logp.detach()  # GSPO-token: value log s_i, gradient ∇log π_t
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, L)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3, DeepSeekMath eq. 4
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        loss = per_token.sum() / max(float(mask.sum() if num_items is None else num_items), 1.0)
    else:  # dr_grpo
        loss = per_token.sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float() * mask
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float() * mask
        stats = {"clip_low": low.sum(), "clip_high": high.sum(), "tokens": mask.sum(),
                 "kl": (kl.detach() * mask).sum() if kl is not None else mask.new_zeros(())}
    return loss, stats


# ---------------------------------------------------------------------- configuration
@dataclass
class GRPOConfig:
    model: str  # nanoseek or Hugging Face checkpoint directory with tokenizer.json
    out: str = "runs/grpo"
    task: str = "arithmetic"
    task_kwargs: dict = field(default_factory=dict)  # e.g. {"max_operand": 9} for ArithmeticTask
    reward_funcs: list[str] = field(default_factory=list)  # extra named reward functions (nanoseek.rewards)
    reward_weights: list[float] = field(default_factory=list)  # one per function, task reward first; default 1
    # process supervision: a built-in process reward's name (nanoseek.rewards.process) or a callable
    # fn(prompts, completions, completion_ids, **columns) -> list[StepRewards | None]; None: outcome supervision
    process_reward: str | Callable | None = None
    num_generations: int = 8  # G
    prompts_per_step: int = 8  # P (global, sharded across ranks)
    max_completion_length: int = 16
    steps: int = 100
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: "constant", or "linear" / "cosine" decay to 0 at `steps`
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.0
    ref_reset_every: int = 0  # copy π into π_ref every N steps (0: never)
    num_iterations: int = 1  # μ
    num_minibatches: int = 1  # optimizer steps per pass over the rollout
    micro_batch_size: int = 0  # rows per forward/backward (0: the whole mini-batch)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    rloo: bool = False
    advantage_eps: float = 1e-4
    importance_sampling_level: str = "token"
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    mask_truncated_completions: bool = False
    share_prompts: bool = True  # run a group's common prompt once in the log-prob passes (exact; see Policy)
    overlong_buffer: int = 0  # DAPO soft overlong penalty buffer L_cache (0: off)
    overlong_penalty: float = 1.0
    reward_timeout_s: float | None = None  # > 0: run non-built-in reward functions in a killable worker
    logp_chunk_tokens: int = 1024
    log_completions_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep: int = 2
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: {rule}")

        if self.num_generations < 2:
            bad("num_generations", "needs >= 2 completions per prompt for a group baseline")
        for name in ("prompts_per_step", "max_completion_length", "steps", "num_iterations", "num_minibatches"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.loss_type not in LOSS_TYPES and self.loss_type not in ALIASES:
            bad("loss_type", f"choose one of {', '.join(list(LOSS_TYPES) + list(ALIASES))}")
        if self.scale_rewards not in ("group", "batch", "none"):
            bad("scale_rewards", "choose group, batch or none")
        if self.importance_sampling_level not in ("token", "sequence"):
            bad("importance_sampling_level", "choose token or sequence")
        if self.beta < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("GRPOConfig: beta must be >= 0, lr > 0 and temperature > 0 (sampling)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"choose one of {', '.join(LR_SCHEDULES)}")
        if self.overlong_buffer and not 0 < self.overlong_buffer <= self.max_completion_length:
            bad("overlong_buffer", "must be in [1, max_completion_length] (0 disables the soft penalty)")
        n_fns = 1 + len(self.reward_funcs)
        if self.reward_weights and len(self.reward_weights) != n_fns:
            bad("reward_weights", f"needs {n_fns} weights (the task reward, then each of reward_funcs)")
        if self.process_reward is not None:
            from nanoseek.rewards import PROCESS_REWARD_FNS

            if not callable(self.process_reward) and self.process_reward not in PROCESS_REWARD_FNS:
                bad("process_reward", f"give a callable or a built-in name: {', '.join(sorted(PROCESS_REWARD_FNS))}")
            if self.rloo:
                bad("rloo", "leave-one-out needs one reward per completion; process supervision normalizes steps "
                    "(set rloo=False or process_reward=None)")
            if self.overlong_buffer:
                bad("overlong_buffer", "the soft overlong penalty shapes the outcome reward, which process "
                    "supervision does not use for advantages (use mask_truncated_completions instead)")

    def to_dict(self) -> dict:
        """``asdict`` with a callable ``process_reward`` recorded by its name (JSON- and checkpoint-safe)."""
        from nanoseek.rewards import reward_name

        pr = self.process_reward
        return {**asdict(replace(self, process_reward=None)),
                "process_reward": pr if pr is None or isinstance(pr, str) else reward_name(pr)}


# ---------------------------------------------------------------------- helpers
def _reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum / min / max of floats across ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    if world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


class Rollout:
    """One step's samples: tokens, outcome rewards (N,), advantages (N,) or per token (N, L) with process
    supervision (then ``steps``: each completion's StepRewards or None), and the log-probs of π_old / π_ref."""

    def __init__(self, batch: Batch, rewards: torch.Tensor, advantages: torch.Tensor, truncated: torch.Tensor,
                 steps: list | None = None):
        self.batch, self.rewards, self.advantages, self.truncated = batch, rewards, advantages, truncated
        self.steps = steps
        self.old_logp: torch.Tensor | None = None
        self.ref_logp: torch.Tensor | None = None


class GRPOTrainer:
    """Holds the policy, the reference, the optimizer and the reward functions; ``step()`` does one GRPO step."""

    kind = "grpo"  # names the run's config file and metrics stream

    def __init__(self, cfg: GRPOConfig, policy: Policy, tokenizer, rank: int = 0, world: int = 1):
        from nanoseek.rewards import get_process_reward_fn, get_reward_fn, task_reward
        from nanoseek.tasks import get_task

        cfg.validate()
        self.cfg, self.policy, self.tokenizer, self.rank, self.world = cfg, policy, tokenizer, rank, world
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        self.reward_fns = [task_reward(self.task)] + [get_reward_fn(n) for n in cfg.reward_funcs]
        self.reward_weights = cfg.reward_weights or [1.0] * len(self.reward_fns)
        pr = cfg.process_reward
        self.process_fn = get_process_reward_fn(pr) if isinstance(pr, str) else pr
        self.ref = policy.copy() if cfg.beta > 0 else None
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.loss_type = ALIASES.get(cfg.loss_type, cfg.loss_type)
        self.bos = getattr(tokenizer, "bos_id", None)

    def checkpoint_state(self) -> dict:
        """What a checkpoint needs beyond the policy and its optimizer for an exact resume."""
        if self.ref is not None and self.cfg.ref_reset_every:
            return {"ref": self.ref.model.state_dict()}
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        if self.ref is not None and "ref" in state:
            self.ref.model.load_state_dict(state["ref"])

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or a linear / cosine decay to 0 at ``steps``."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return cfg.lr * (1 - progress)
        if cfg.lr_schedule == "cosine":
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr

    # -------------------------------------------------------------- data
    def prompts(self, step: int, round_: int = 0):
        """This rank's share of the step's P prompts (deterministic in seed, step and round: exact on resume)."""
        from nanoseek.tasks import examples

        P = self.cfg.prompts_per_step
        exs = examples(self.task, P, "train", seed=(self.cfg.seed * 1_000_003 + step) * 101 + round_)
        lo, hi = self.rank * P // self.world, (self.rank + 1) * P // self.world
        return exs[lo:hi]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_bos=self.bos is not None)

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def sample(self, exs, step: int, round_: int) -> tuple[list, list[list[int]], list[list[int]]]:
        """G completions per example -> (examples repeated, prompt ids, completion ids), grouped contiguously."""
        cfg, G = self.cfg, self.cfg.num_generations
        rep = [ex for ex in exs for _ in range(G)]
        prompt_ids = [self.encode(ex.prompt) for ex in rep]
        seed = ((cfg.seed * 1_000_003 + step) * 101 + round_) * 64 + self.rank
        completions = self.policy.rollout(prompt_ids, cfg.max_completion_length, temperature=cfg.temperature,
                                          top_p=cfg.top_p, top_k=cfg.top_k, seed=seed)
        return rep, prompt_ids, completions

    def score(self, rep, completions: list[list[int]]):
        from nanoseek.rewards import compute_rewards

        texts = [self.tokenizer.decode(c) for c in completions]
        columns = {"example": rep, "answer": [ex.answer for ex in rep]}
        result = compute_rewards(self.reward_fns, self.reward_weights, [ex.prompt for ex in rep], texts, columns,
                                 timeout_s=self.cfg.reward_timeout_s)
        return texts, result

    def score_steps(self, rep, texts: list[str], completions: list[list[int]]) -> list:
        """Each completion's StepRewards (or None) from the process reward, failures contained and logged."""
        from nanoseek.rewards import compute_process_rewards

        columns = {"example": rep, "answer": [ex.answer for ex in rep], "tokenizer": self.tokenizer}
        steps, _ = compute_process_rewards(self.process_fn, [ex.prompt for ex in rep], texts, completions, columns,
                                           timeout_s=self.cfg.reward_timeout_s)
        return steps

    def collect(self, step: int) -> tuple[Rollout, dict, list]:
        """Sample, score and (with dynamic sampling) keep resampling until the batch has P informative groups: groups
        whose outcome rewards differ or, with a process reward, whose step rewards differ."""
        cfg, G = self.cfg, self.cfg.num_generations
        process = self.process_fn is not None
        want = len(self.prompts(step))
        kept: list[tuple] = []  # (example rows, prompt ids, completion ids, texts, total rewards, step rewards)
        seen_rewards: list[float] = []
        seen_steps: list[float] = []  # every step reward of every sampled completion (process supervision)
        no_steps = 0  # sampled completions without any step reward
        per_fn_seen: dict[str, list[float]] = {}
        zero_std_groups = groups = 0
        for round_ in range(1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)):
            exs = self.prompts(step, round_)
            rep, pids, cids = self.sample(exs, step, round_)
            texts, res = self.score(rep, cids)
            steps = self.score_steps(rep, texts, cids) if process else [None] * len(rep)
            total = torch.tensor([float(x) for x in res.total])
            seen_rewards += total.tolist()
            seen_steps += [r for s in steps if s is not None for r in s.rewards]
            no_steps += sum(s is None or not s.rewards for s in steps) if process else 0
            for name, vals in res.per_fn.items():
                per_fn_seen.setdefault(name, []).extend(float("nan") if v is None else float(v) for v in vals)
            for g in range(0, len(rep), G):
                groups += 1
                flat = bool((total[g : g + G] == total[g]).all())
                zero_std_groups += flat
                if process:
                    flat = len({r for s in steps[g : g + G] if s is not None for r in s.rewards}) <= 1
                if cfg.dynamic_sampling and flat:
                    continue
                kept.append((rep[g : g + G], pids[g : g + G], cids[g : g + G], texts[g : g + G], total[g : g + G],
                             steps[g : g + G]))
            if len(kept) >= want:
                break
        kept = kept[:want]
        rep = [x for k in kept for x in k[0]]
        pids = [x for k in kept for x in k[1]]
        cids = [x for k in kept for x in k[2]]
        texts = [x for k in kept for x in k[3]]
        rewards = torch.cat([k[4] for k in kept]) if kept else torch.zeros(0)
        steps = [x for k in kept for x in k[5]]
        lengths = torch.tensor([len(c) for c in cids], dtype=torch.float)
        eos = self.policy.eos_id
        truncated = torch.tensor([len(c) >= cfg.max_completion_length and (eos is None or c[-1] != eos)
                                  for c in cids], dtype=torch.bool)
        if cfg.overlong_buffer and len(cids):
            rewards = rewards + soft_overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_buffer,
                                                      cfg.overlong_penalty)
        batch = Batch.build(pids, cids, self.policy.pad_id, width=cfg.max_completion_length) if cids else None
        if batch is not None and cfg.mask_truncated_completions:
            batch.completion_mask[truncated] = 0.0
        if process:
            adv = self.process_advantages(steps, batch.completion_ids.shape[1] if batch is not None else 0)
            sample_adv = [a[: len(c)] for a, c in zip(adv.tolist(), cids)]  # per token
        else:
            adv = self.advantages(rewards)
            sample_adv = adv.tolist()
        info = {"seen_rewards": seen_rewards, "per_fn": per_fn_seen, "zero_std": zero_std_groups, "groups": groups,
                "lengths": lengths, "truncated": truncated, "seen_steps": seen_steps, "no_steps": no_steps}
        samples = list(zip(rep, texts, rewards.tolist(), sample_adv))
        rollout = Rollout(batch, rewards, adv, truncated, steps if process else None) if batch is not None else None
        return rollout, info, samples

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Outcome-supervision advantages (N,) of this rank's groups; "batch" scaling uses every rank's rewards."""
        cfg, G = self.cfg, self.cfg.num_generations
        if not len(rewards):
            return torch.zeros(0)
        if cfg.scale_rewards != "batch" or self.world == 1:
            return group_advantages(rewards, G, cfg.scale_rewards, cfg.rloo, cfg.advantage_eps)
        s, s2, n = _reduce([float(rewards.sum()), float((rewards.double() ** 2).sum()), float(len(rewards))])
        mean = s / max(n, 1)
        std = math.sqrt(max(s2 - n * mean * mean, 0.0) / max(n - 1, 1))
        return group_advantages(rewards, G, "none", cfg.rloo) / (std + cfg.advantage_eps)

    def process_advantages(self, steps: list, length: int) -> torch.Tensor:
        """Process-supervision advantages (N, length) of this rank's groups (steps: StepRewards or None each);
        "batch" scaling takes the std over every rank's steps."""
        cfg, G = self.cfg, self.cfg.num_generations
        rs = [s.rewards if s is not None else [] for s in steps]
        es = [s.ends if s is not None else [] for s in steps]
        if cfg.scale_rewards != "batch" or self.world == 1:
            return process_advantages(rs, es, G, length, cfg.advantage_eps, cfg.scale_rewards)
        r = torch.tensor([x for xs in rs for x in xs], dtype=torch.float64)
        s, s2, n = _reduce([float(r.sum()), float((r**2).sum()), float(r.numel())])
        mean = s / max(n, 1)
        std = math.sqrt(max(s2 - n * mean * mean, 0.0) / max(n - 1, 1))
        return process_advantages(rs, es, G, length, scale="none") / (std + cfg.advantage_eps)

    # -------------------------------------------------------------- log-probs
    def micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        mb = self.cfg.micro_batch_size or len(rows)
        return [rows[i : i + mb] for i in range(0, len(rows), mb)]

    @torch.no_grad()
    def logprobs(self, policy: Policy, batch: Batch) -> torch.Tensor:
        out = torch.zeros_like(batch.completion_mask)
        for rows in self.micro_batches(torch.arange(len(batch))):
            lp, _ = policy.completion_logprobs(batch.select(rows).to(policy.device), temperature=self.cfg.temperature,
                                               chunk_tokens=self.cfg.logp_chunk_tokens)
            out[rows] = lp.cpu()
        return out

    # -------------------------------------------------------------- one step
    def step(self, step: int) -> tuple[dict, list]:
        cfg, model = self.cfg, self.policy.model
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        if self.ref is not None and cfg.ref_reset_every and step > 0 and step % cfg.ref_reset_every == 0:
            self.ref.model.load_state_dict(model.state_dict())
        rollout, info, samples = self.collect(step)
        t_gen = time.perf_counter() - t0
        model.train()
        reuse_old = cfg.num_iterations == 1 and cfg.num_minibatches == 1  # π_old = π: ratio 1, skip a pass
        n_local = len(rollout.batch) if rollout is not None else 0
        if rollout is not None and not reuse_old:
            rollout.old_logp = self.logprobs(self.policy, rollout.batch)
        if rollout is not None and self.ref is not None:
            rollout.ref_logp = self.logprobs(self.ref, rollout.batch)
        tokens_global = _reduce([float(rollout.batch.completion_mask.sum()) if n_local else 0.0])[0]
        sums = dict.fromkeys(("kl", "clip_low", "clip_high", "tokens", "entropy", "loss"), 0.0)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        grad_norms = []
        for _ in range(cfg.num_iterations):
            order = torch.randperm(n_local, generator=gen) if n_local else torch.zeros(0, dtype=torch.long)
            for mini in order.tensor_split(cfg.num_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                micro = self.micro_batches(mini) if len(mini) else []
                for rows in micro:
                    sub = rollout.batch.select(rows).to(self.policy.device)
                    logp, ent = self.policy.completion_logprobs(sub, temperature=cfg.temperature,
                                                                chunk_tokens=cfg.logp_chunk_tokens, entropy=True)
                    dev = logp.device
                    old = logp.detach() if reuse_old else rollout.old_logp[rows].to(dev)
                    ref = rollout.ref_logp[rows].to(dev) if rollout.ref_logp is not None else None
                    loss, st = grpo_loss(
                        logp, old, rollout.advantages[rows].to(dev), sub.completion_mask, ref_logp=ref,
                        beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        loss_type=self.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                        max_completion_length=cfg.max_completion_length,
                        num_items=tokens_global / cfg.num_minibatches / self.world,
                    )
                    if self.loss_type != "dapo":  # dapo's normalizer already spans the mini-batch
                        loss = loss / len(micro)
                    loss.backward()
                    for k in ("kl", "clip_low", "clip_high", "tokens"):
                        sums[k] += float(st[k])
                    sums["entropy"] += float((ent * sub.completion_mask).sum())
                    sums["loss"] += float(loss.detach()) * len(rows) / max(n_local, 1)
                _average_gradients(model, self.world)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
                self.optimizer.step()
        dt = time.perf_counter() - t0
        return self.metrics(step, info, sums, grad_norms, dt, t_gen), samples

    def metrics(self, step: int, info: dict, sums: dict, grad_norms: list[float], dt: float, t_gen: float) -> dict:
        cfg = self.cfg
        r = torch.tensor(info["seen_rewards"], dtype=torch.float64)
        s, s2, n, zero, groups, tok, kl, lo, hi, ent, ln = _reduce([
            float(r.sum()), float((r**2).sum()), float(r.numel()), float(info["zero_std"]), float(info["groups"]),
            sums["tokens"], sums["kl"], sums["clip_low"], sums["clip_high"], sums["entropy"],
            float(info["lengths"].sum()),
        ])
        n_c = _reduce([float(len(info["lengths"])), float(info["truncated"].sum())])
        lmin = _reduce([float(info["lengths"].min()) if len(info["lengths"]) else math.inf], "min")[0]
        lmax = _reduce([float(info["lengths"].max()) if len(info["lengths"]) else 0.0], "max")[0]
        mean = s / max(n, 1)
        passes = cfg.num_iterations
        m = {
            "step": step, "reward": mean, "reward_std": math.sqrt(max(s2 - n * mean * mean, 0.0) / max(n - 1, 1)),
            "frac_reward_zero_std": zero / max(groups, 1),
            "completions/mean_length": ln / max(n_c[0], 1), "completions/min_length": lmin if n_c[0] else 0.0,
            "completions/max_length": lmax, "completions/clipped_ratio": n_c[1] / max(n_c[0], 1),
            "entropy": ent / max(tok, 1), "clip_ratio/low_mean": lo / max(tok, 1),
            "clip_ratio/high_mean": hi / max(tok, 1), "loss": _reduce([sums["loss"]])[0] / self.world / passes,
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "num_tokens": tok / passes,
            "step_time": dt, "generation_time": t_gen, "tokens_per_s": ln / dt,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if cfg.beta > 0:
            m["kl"] = kl / max(tok, 1)
        for name, vals in info["per_fn"].items():
            v = torch.tensor(vals, dtype=torch.float64)
            v = v[~v.isnan()]
            tot, cnt = _reduce([float(v.sum()), float(v.numel())])
            m[f"rewards/{name}/mean"] = tot / max(cnt, 1)
        if self.process_fn is not None:  # mean step reward, and the completions that got no step (or failed)
            tot, cnt, none = _reduce([float(sum(info["seen_steps"])), float(len(info["seen_steps"])),
                                      float(info["no_steps"])])
            m["rewards/process/mean"] = tot / max(cnt, 1)
            m["rewards/process/frac_no_steps"] = none / max(n, 1)
        return m


# ---------------------------------------------------------------------- the run
class HFTokenizer:
    """A transformers tokenizer behind nanoseek's ``Tokenizer`` interface (encode/decode, pad/bos/eos ids, save)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("the checkpoint's tokenizer has neither a pad nor an eos token; GRPO needs one")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer: nanoseek's when it has nanoseek's special tokens, else transformers'."""
    from nanoseek.tokenizer import Tokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {directory}: no tokenizer.json next to the checkpoint")
    try:
        return Tokenizer.load(directory)
    except ValueError:  # not nanoseek's special tokens: any Hugging Face tokenizer
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))


def train_grpo(cfg: GRPOConfig, trainer_cls: type[GRPOTrainer] = GRPOTrainer) -> dict:
    """Run GRPO as configured (or, with ``trainer_cls=PPOTrainer``, the PPO baseline); returns a summary (steps,
    final/first reward, wall time, run dir). Checkpoints every ``save_every`` steps, on Ctrl-C and at the end;
    ``resume`` continues exactly from the latest."""
    from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, resolve_model_dir, save_checkpoint
    from nanoseek.distributed import init_distributed
    from nanoseek.metrics import MetricsLogger

    cfg.validate()
    cfg.model = str(resolve_model_dir(cfg.model))
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.model)
    policy = Policy.load(cfg.model, tokenizer.pad_id, tokenizer.eos_id)
    policy.share_prompts = cfg.share_prompts
    policy.model.to(device)
    out = Path(cfg.out)
    trainer = trainer_cls(cfg, policy, tokenizer, rank, world)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt, policy.model, trainer.optimizer)
        start = int(state["step"])
        trainer.load_checkpoint_state(state)
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{trainer.kind}_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    logger = MetricsLogger(out, cfg.steps, trainer.kind, enabled=main, start_step=start, progress=cfg.progress)
    first = last = None
    t0 = time.perf_counter()

    def save(step: int) -> None:
        state = {"step": step, "config": cfg.to_dict(), **trainer.checkpoint_state()}
        if main:
            save_checkpoint(out, step, policy.model, trainer.optimizer, state, keep=cfg.keep, tokenizer=tokenizer)

    done = start
    try:
        for step in range(start, cfg.steps):
            m, samples = trainer.step(step)
            done = step + 1
            first = m["reward"] if first is None else first
            last = m["reward"]
            if main:
                logger.log(step, **{k: v for k, v in m.items() if k != "step"})
                if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                    with open(out / "completions.jsonl", "a") as f:
                        for ex, text, r, a in samples[: 4 * cfg.num_generations]:
                            f.write(json.dumps({"step": step, "prompt": ex.prompt, "completion": text, "reward": r,
                                                "advantage": a, "answer": ex.answer}) + "\n")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
    except KeyboardInterrupt:  # Ctrl-C: keep what was done; --resume continues from here
        print(f"interrupted: saving step {done}", file=sys.stderr)
    if done > start:
        save(done)
    logger.close()
    return {"steps": done, "first_reward": first, "final_reward": last, "wall_time": time.perf_counter() - t0,
            "run_dir": str(out)}


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="nanoseek or Hugging Face checkpoint directory (with tokenizer.json)")
    a("--out", default="runs/grpo", help="run directory: metrics.jsonl, completions.jsonl, checkpoints/")
    a("--task", default="arithmetic", help="built-in task giving prompts and the task reward")
    a("--reward-funcs", nargs="*", default=[], help="extra reward functions (math, format, countdown, code)")
    a("--reward-weights", nargs="*", type=float, default=[], help="weights: task reward first, then each extra")
    a("--process-reward", default=None, help="process supervision: per-step rewards give per-token advantages "
      "(built-in: arithmetic)")
    a("--num-generations", type=int, default=8, help="G completions per prompt")
    a("--prompts-per-step", type=int, default=8, help="P prompts per step (global)")
    a("--max-completion-length", type=int, default=16)
    a("--steps", type=int, default=100)
    a("--lr", type=float, default=1e-5)
    a("--warmup-steps", type=int, default=0)
    a("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after warm-up: constant, or decay to 0")
    a("--beta", type=float, default=0.0, help="k3 KL weight; > 0 loads a reference model")
    a("--ref-reset-every", type=int, default=0, help="copy the policy into the reference every N steps")
    a("--num-iterations", type=int, default=1, help="μ passes over each rollout")
    a("--num-minibatches", type=int, default=1, help="optimizer steps per pass")
    a("--micro-batch-size", type=int, default=0, help="rows per forward/backward (0: whole mini-batch)")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=None)
    a("--epsilon", type=float, default=0.2, help="clip ε (ε_low)")
    a("--epsilon-high", type=float, default=None, help="clip-higher ε_high (default ε)")
    a("--loss-type", default="grpo", choices=sorted(LOSS_TYPES) + sorted(ALIASES))
    a("--scale-rewards", default="group", choices=["group", "batch", "none"])
    a("--rloo", action="store_true", help="leave-one-out baseline")
    a("--importance-sampling-level", default="token", choices=["token", "sequence"], help="sequence = GSPO")
    a("--dynamic-sampling", action="store_true", help="DAPO: drop all-equal groups and resample")
    a("--max-resample-rounds", type=int, default=3)
    a("--mask-truncated-completions", action="store_true")
    a("--no-share-prompts", dest="share_prompts", action="store_false",
      help="run every row's prompt separately in the log-prob passes (to measure what sharing saves)")
    a("--overlong-buffer", type=int, default=0, help="DAPO soft overlong penalty buffer (0: off)")
    a("--save-every", type=int, default=0)
    a("--log-completions-every", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    a("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    names = {f.name for f in fields(GRPOConfig)}
    return GRPOConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    summary = train_grpo(config_from_args(args))
    print(json.dumps(summary))
    return 0
