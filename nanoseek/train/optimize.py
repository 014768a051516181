"""The optimisation loop of every RL algorithm: μ passes over a rollout, each shuffled into mini-batches (one
optimizer step each) of length-planned micro-batches. Losses are normalised by the whole mini-batch, so any split gives
the same gradient; gradients are averaged over ranks, clipped and stepped for the policy and PPO's critic."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from nanoseek.cli_args import option
from nanoseek.distributed import average_gradients, reduce_floats, world_size
from nanoseek.policy import Batch, Policy
from nanoseek.rollout import Rollout
from nanoseek.train.schedule import clip_grad_norm

PAD_TOLERANCE = 1.15  # padded tokens ≤ 1.15 × real tokens over a mini-batch's micro-batches


@dataclass(frozen=True, kw_only=True)
class OptimizeConfig:
    """The passes over a rollout and how its forwards are cut (flags of every RL command)."""

    num_iterations: int = option(1, "μ passes over each rollout", min=1)
    num_minibatches: int = option(1, "optimizer steps per pass", min=1)
    micro_batch_size: int = option(0, "most rows per forward/backward (0: only the padding rule splits)", min=0)
    temperature: float = option(1.0, "sampling temperature (the log-probs are taken at it too)", gt=0)
    logp_chunk_tokens: int = option(1024, "completion tokens per vocabulary-head matmul", min=1)


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one forward/backward, their tokens on the device, and their mini-batch's normalizers."""

    rows: torch.Tensor
    batch: Batch
    num_rows: int  # the mini-batch's rows on this rank
    num_tokens: float  # its loss tokens on this rank
    global_tokens: float  # its loss tokens over every rank / ranks (DAPO's token mean)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This micro-batch's rows of a rollout tensor, (N,) or (N, L) cut to its width, on its device."""
        x = x[self.rows]
        return (x if x.dim() == 1 else x[:, : self.batch.completion_ids.shape[1]]).to(self.batch.completion_ids.device)


LossFn = Callable[[Rollout, MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class OptimizeStats:
    """What one RL step's forwards (log-prob passes and ``optimize``) measured."""

    grad_norms: list[float] = field(default_factory=list)  # the first trainable's, per optimizer step
    # Σ over micro-batches: the loss function's statistics, "entropy" (of loss tokens), "loss" (weighted by rows)
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_pass_logp: torch.Tensor | None = None  # (N, L) π before any update (only with a single mini-batch)
    processed: int = 0  # tokens the forwards processed, padding included
    real: int = 0  # the real tokens among them

    def select(self, policy: Policy, batch: Batch, rows: torch.Tensor) -> Batch:
        """``batch.select(rows)`` on ``policy``'s device, its tokens counted."""
        sub = batch.select(rows).to(policy.device)
        processed, real = sub.token_counts(policy.shares(sub))
        self.processed, self.real = self.processed + processed, self.real + real
        return sub


def plan_micro_batches(batch: Batch, rows: torch.Tensor, max_rows: int, shared: bool) -> list[torch.Tensor]:
    """Split ``rows`` into micro-batches by completion length (longest first), at most ``max_rows`` rows each (0: any),
    cut only where the padded tokens so far would exceed ``PAD_TOLERANCE`` × real ones (``Batch.token_counts``)."""
    clen = batch.completion_lens[rows].tolist()

    def counts(cand: list[int]) -> tuple[int, int]:  # (processed, real) tokens of one micro-batch
        return batch.select(rows[torch.tensor(cand)]).token_counts(shared)

    plans, cur = [], []  # the closed micro-batches, the open one
    processed = real = 0  # of the closed micro-batches
    for i in sorted(range(len(rows)), key=lambda i: -clen[i]):  # stable: a group's rows stay together
        p, r = counts(cur + [i])
        if cur and ((max_rows and len(cur) >= max_rows) or processed + p > PAD_TOLERANCE * (real + r)):
            p, r = counts(cur)
            processed, real = processed + p, real + r
            plans.append(cur)
            cur = []
        cur = cur + [i]
    return [rows[torch.tensor(p, dtype=torch.long)] for p in [*plans, cur] if p]


@torch.no_grad()
def per_token(fn: Callable[[Batch], torch.Tensor], policy: Policy, batch: Batch, max_rows: int,
              stats: OptimizeStats) -> torch.Tensor:
    """``fn`` ((n, L): a value per completion token) over ``batch`` in length-planned micro-batches -> (N, L), CPU."""
    out = torch.zeros(batch.completion_ids.shape)
    for rows in plan_micro_batches(batch, torch.arange(len(batch)), max_rows, policy.shares(batch)):
        v = fn(stats.select(policy, batch, rows)).cpu()
        out[rows, : v.shape[1]] = v
    return out


def rollout_logprobs(policy: Policy, batch: Batch, cfg: OptimizeConfig, stats: OptimizeStats) -> torch.Tensor:
    """log π(o_t | ·) of every completion token of ``batch`` (N, L), on the CPU."""
    return per_token(lambda sub: policy.completion_logprobs(sub, temperature=cfg.temperature,
                                                            chunk_tokens=cfg.logp_chunk_tokens)[0],
                     policy, batch, cfg.micro_batch_size, stats)


def optimize(policy: Policy, rollout: Rollout, loss_fn: LossFn, trainables: Sequence[tuple[nn.Module, Optimizer]],
             cfg: OptimizeConfig, generator: torch.Generator, stats: OptimizeStats, max_grad_norm: float) -> None:
    """μ passes of mini-batch steps over ``rollout`` per (module, optimizer), into ``stats``; equal steps per rank."""
    n, mask = len(rollout), rollout.mask
    tokens_global = reduce_floats([float(mask.sum())])[0]
    stats.first_pass_logp = torch.zeros(mask.shape) if cfg.num_iterations == cfg.num_minibatches == 1 else None
    shared = policy.shares(rollout.batch)  # the planner's cost model, fixed for the whole rollout
    for module, _ in trainables:
        module.train()
    for _ in range(cfg.num_iterations):
        for mini in torch.randperm(n, generator=generator).tensor_split(cfg.num_minibatches):
            for _, optimizer in trainables:
                optimizer.zero_grad(set_to_none=True)
            num_tokens = float(mask[mini].sum())
            for rows in plan_micro_batches(rollout.batch, mini, cfg.micro_batch_size, shared):
                sub = stats.select(policy, rollout.batch, rows)
                mb = MicroBatch(rows, sub, len(mini), num_tokens, tokens_global / cfg.num_minibatches / world_size())
                logp, ent = policy.completion_logprobs(sub, temperature=cfg.temperature,
                                                       chunk_tokens=cfg.logp_chunk_tokens, entropy=True)
                loss, st = loss_fn(rollout, mb, logp)
                loss.backward()
                st = {**st, "entropy": (ent * mb.take(mask)).sum(), "loss": float(loss.detach()) * len(mini) / n}
                for k, v in st.items():
                    stats.sums[k] += float(v)
                if stats.first_pass_logp is not None:
                    stats.first_pass_logp[rows, : logp.shape[1]] = logp.detach().cpu()
            for i, (module, optimizer) in enumerate(trainables):
                average_gradients(module)
                norm = clip_grad_norm(module, max_grad_norm)
                if i == 0:
                    stats.grad_norms.append(norm)
                optimizer.step()
