"""Rollout collection: prompts -> G sampled completions each -> rewards -> a frozen ``Rollout``.

``sample_and_score`` is the one sample -> score -> verify step, shared by ``collect``, ``nanoseek sample`` and
``nanoseek.evaluate``. ``collect`` samples every group of one step, scores it (outcome rewards and, optionally,
process rewards), and with ``informative_only`` (DAPO's dynamic sampling) keeps only groups whose rewards differ,
resampling up to a cap. Later stages never mutate a ``Rollout``: they attach what they compute (advantages, π_old
and π_ref log-probs) with ``Rollout.attach``, which returns a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from nanoseek.datasets import Row, columns_of
from nanoseek.policy import Batch, Policy, Samples, SamplingParams
from nanoseek.rewards import (
    RewardResult,
    StepRewards,
    compute_process_rewards,
    compute_rewards,
    reward_name,
    trl_completions,
)


@dataclass(frozen=True)
class Scorer:
    """The reward functions of a run: weighted outcome rewards (TRL signature) and an optional process reward.
    Rows are dataset rows (``nanoseek.datasets.Row``, a built-in task's included): each function gets the rows'
    prompts, the completions as TRL passes them (a message list for a conversational prompt), the completion ids
    and the dataset's ``columns`` as keyword lists aligned with the completions."""

    reward_fns: Sequence[Callable]
    weights: Sequence[float]
    tokenizer: object
    process_fn: Callable | None = None
    timeout_s: float | None = None
    columns: frozenset[str] = frozenset({"answer", "example"})

    @property
    def names(self) -> list[str]:
        return [reward_name(fn) for fn in self.reward_fns]

    def outcome(self, rows: list[Row], texts: list[str], completion_ids: list[list[int]] | None = None):
        prompts = [r.prompt for r in rows]
        return compute_rewards(self.reward_fns, self.weights, prompts, trl_completions(prompts, texts),
                               columns_of(rows, self.columns), timeout_s=self.timeout_s,
                               completion_ids=completion_ids)

    def steps(self, rows: list[Row], texts: list[str], completions: list[list[int]]):
        """Each completion's StepRewards (or None), failures contained and logged."""
        prompts = [r.prompt for r in rows]
        columns = {**columns_of(rows, self.columns), "tokenizer": self.tokenizer}
        steps, _ = compute_process_rewards(self.process_fn, prompts, trl_completions(prompts, texts), completions,
                                           columns, timeout_s=self.timeout_s)
        return steps


@dataclass(frozen=True)
class Scored:
    """One completion per row: the prompt ids, what was sampled, the decoded texts and their rewards."""

    prompt_ids: list[list[int]]
    samples: Samples
    texts: list[str]
    result: RewardResult

    def verified(self, names: Sequence[str], min_reward: float = 1.0) -> list[bool]:
        """Per completion: every reward function in ``names`` gave at least ``min_reward`` (None, "no verdict",
        never passes) and it ended by itself (one cut off at the length cap is not an answer)."""
        values = [self.result.per_fn[n] for n in names]
        return [not cut and all(v[j] is not None and v[j] >= min_reward for v in values)
                for j, cut in enumerate(self.samples.truncated)]


@torch.no_grad()
def sample_and_score(policy: Policy, encode: Callable[[str | list[dict]], list[int]],
                     decode: Callable[[list[int]], str], rows: list[Row], scorer: Scorer, params: SamplingParams,
                     seed: int, *, batch_size: int | None = None, desc: str | None = None) -> Scored:
    """Sample one completion per row (repeat a row for several), in batches of ``batch_size`` (batch b seeded
    with ``seed + b``), then score them all with ``scorer.outcome``; ``desc`` shows a progress bar (batches)."""
    prompt_ids = [encode(r.prompt) for r in rows]
    size = batch_size or max(len(rows), 1)
    starts = tqdm(range(0, len(rows), size), desc=desc, dynamic_ncols=True, leave=False, disable=desc is None)
    parts = [policy.sample(prompt_ids[start : start + size], params, seed + b) for b, start in enumerate(starts)]
    samples = Samples([c for p in parts for c in p.completions], [lp for p in parts for lp in p.logprobs],
                      [t for p in parts for t in p.truncated])
    texts = [decode(c) for c in samples.completions]
    return Scored(prompt_ids, samples, texts, scorer.outcome(rows, texts, samples.completions))


@dataclass(frozen=True)
class Rollout:
    """One step's samples, in groups of G contiguous rows (row i belongs to group ``batch.prompt_index[i]``).

    rewards: (N,) weighted outcome reward; rewards_per_fn: name -> (N,) raw values (NaN where a function gave
    none); truncated: (N,) reached the length cap without eos; sampler_logp: (N, L) each token's log-prob under the
    sampling distribution; steps: per-row StepRewards (process supervision) or None. Attached later:
    advantages (N,) or (N, L), loss_mask (N, L) (default the completion mask), old_logp / ref_logp (N, L), and
    ``extras`` (e.g. PPO's values and returns).
    """

    batch: Batch
    examples: tuple[Row, ...]  # (U,) one dataset row per group
    texts: tuple[str, ...]  # (N,)
    rewards: torch.Tensor
    rewards_per_fn: dict[str, torch.Tensor]
    truncated: torch.Tensor
    sampler_logp: torch.Tensor
    steps: tuple[StepRewards | None, ...] | None = None
    advantages: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def mask(self) -> torch.Tensor:
        """(N, L) the tokens the loss is taken on."""
        return self.batch.completion_mask if self.loss_mask is None else self.loss_mask

    def attach(self, **values) -> Rollout:
        return replace(self, **values)


@dataclass(frozen=True)
class CollectStats:
    """What sampling saw, dropped groups included (for metrics): every sampled completion's outcome reward and
    per-function values, group counts, and the kept rows' lengths."""

    seen_rewards: tuple[float, ...]
    seen_per_fn: dict[str, tuple[float, ...]]
    groups: int
    zero_std_groups: int
    seen_steps: tuple[float, ...]  # every step reward of every sampled completion (process supervision)
    no_steps: int  # sampled completions without any step reward


def collect(policy: Policy, encode: Callable[[str | list[dict]], list[int]], decode: Callable[[list[int]], str],
            prompts: Callable[[int], list[Row]], scorer: Scorer, *, num_generations: int,
            params: SamplingParams, seed: Callable[[int], int], informative_only: bool = False,
            max_resample_rounds: int = 0) -> tuple[Rollout, CollectStats]:
    """Sample ``num_generations`` completions of each prompt of ``prompts(round)``, score them, and keep the groups
    (with ``informative_only``: only groups whose outcome rewards, or with a process reward whose step rewards,
    differ, resampling with ``prompts(round + 1)`` up to ``max_resample_rounds`` times until as many groups as
    round 0's prompts are kept). ``seed(round)`` seeds each round's sampling."""
    G = num_generations
    process = scorer.process_fn is not None
    kept: list[dict] = []
    seen: list[float] = []
    seen_fn: dict[str, list[float]] = {name: [] for name in scorer.names}
    seen_steps: list[float] = []
    no_steps = zero_std = groups = 0
    want = None
    for round_ in range(1 + (max_resample_rounds if informative_only else 0)):
        exs = prompts(round_)
        want = len(exs) if want is None else want
        rows = [ex for ex in exs for _ in range(G)]
        scored = sample_and_score(policy, encode, decode, rows, scorer, params, seed(round_))
        samples, texts, result = scored.samples, scored.texts, scored.result
        steps = scorer.steps(rows, texts, samples.completions) if process else [None] * len(rows)
        seen += result.total
        for name, values in result.per_fn.items():
            seen_fn[name] += [float("nan") if v is None else float(v) for v in values]
        seen_steps += [r for s in steps if s is not None for r in s.rewards]
        no_steps += sum(s is None or not s.rewards for s in steps) if process else 0
        for g, ex in enumerate(exs):
            sl = slice(g * G, (g + 1) * G)
            groups += 1
            flat = len(set(result.total[sl])) == 1
            zero_std += flat
            if process:
                flat = len({r for s in steps[sl] if s is not None for r in s.rewards}) <= 1
            if informative_only and flat:
                continue
            kept.append({"example": ex, "prompt": scored.prompt_ids[g * G], "completions": samples.completions[sl],
                         "logprobs": samples.logprobs[sl], "truncated": samples.truncated[sl], "texts": texts[sl],
                         "total": result.total[sl], "steps": steps[sl],
                         "per_fn": {name: values[sl] for name, values in result.per_fn.items()}})
        if len(kept) >= want:
            break
    kept = kept[:want]
    completions = [c for k in kept for c in k["completions"]]
    batch = Batch.build([k["prompt"] for k in kept], [g for g in range(len(kept)) for _ in range(G)], completions,
                        policy.pad_id)
    sampler_logp = torch.zeros(batch.completion_ids.shape)
    for i, lp in enumerate(lp for k in kept for lp in k["logprobs"]):
        sampler_logp[i, : len(lp)] = torch.tensor(lp)
    per_fn = {name: torch.tensor([float("nan") if v is None else float(v) for k in kept for v in k["per_fn"][name]])
              for name in scorer.names}
    rollout = Rollout(
        batch=batch, examples=tuple(k["example"] for k in kept), texts=tuple(t for k in kept for t in k["texts"]),
        rewards=torch.tensor([r for k in kept for r in k["total"]], dtype=torch.float32), rewards_per_fn=per_fn,
        truncated=torch.tensor([t for k in kept for t in k["truncated"]], dtype=torch.bool),
        sampler_logp=sampler_logp, steps=tuple(s for k in kept for s in k["steps"]) if process else None,
    )
    stats = CollectStats(tuple(seen), {k: tuple(v) for k, v in seen_fn.items()}, groups, zero_std, tuple(seen_steps),
                         no_steps)
    return rollout, stats
