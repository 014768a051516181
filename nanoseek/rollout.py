"""Rollout collection: prompts -> G sampled completions each -> rewards -> a frozen ``Rollout``. ``sample_and_score``
is the one sample -> score -> verify step of ``collect``, ``nanoseek sample`` and ``nanoseek.evaluate``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanoseek.datasets import Row, columns_of
from nanoseek.policy import Batch, Policy, Samples, SamplingParams
from nanoseek.rewards import RewardResult, compute_process_rewards, compute_rewards, reward_name, trl_completions
from nanoseek.rewards.process import StepRewards


@dataclass(frozen=True)
class Scorer:
    """The reward functions of a run: weighted outcome rewards (TRL signature) and an optional process reward."""

    reward_fns: Sequence[Callable]
    weights: Sequence[float] | None = None  # None: all 1
    tokenizer: object = None
    process_fn: Callable | None = None
    timeout_s: float | None = None
    columns: frozenset[str] = frozenset({"answer", "example"})

    @property
    def names(self) -> list[str]:
        return [reward_name(fn) for fn in self.reward_fns]

    def outcome(self, rows: list[Row], texts: list[str], completion_ids: list[list[int]] | None = None):
        prompts = [r.prompt for r in rows]
        return compute_rewards(self.reward_fns, self.weights, prompts, trl_completions(prompts, texts),
                               columns_of(rows, self.columns), timeout_s=self.timeout_s, completion_ids=completion_ids)

    def steps(self, rows: list[Row], texts: list[str], completions: list[list[int]]):
        prompts = [r.prompt for r in rows]
        columns = {**columns_of(rows, self.columns), "tokenizer": self.tokenizer}
        return compute_process_rewards(self.process_fn, prompts, trl_completions(prompts, texts), completions,
                                       columns, timeout_s=self.timeout_s)[0]


@dataclass(frozen=True)
class Scored:
    """One completion per row: the prompt ids, what was sampled, the decoded texts and their rewards."""

    prompt_ids: list[list[int]]
    samples: Samples
    texts: list[str]
    result: RewardResult

    def verified(self, names: Sequence[str], min_reward: float = 1.0) -> list[bool]:
        """Per completion: each function in ``names`` gave >= ``min_reward`` (None never does), and not truncated."""
        values = [self.result.per_fn[n] for n in names]
        return [not cut and all(v[j] is not None and v[j] >= min_reward for v in values)
                for j, cut in enumerate(self.samples.truncated)]


@torch.no_grad()
def sample_and_score(policy: Policy, encode: Callable[[str | list[dict]], list[int]],
                     decode: Callable[[list[int]], str], rows: list[Row], scorer: Scorer, params: SamplingParams,
                     seed: int, *, batch_size: int | None = None, desc: str | None = None) -> Scored:
    """One completion per row, batch b of ``batch_size`` seeded ``seed + b``, scored; ``desc``: a progress bar."""
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
    rewards_per_fn holds NaN where a function gave no value; steps: per-row StepRewards (process supervision) or
    None; attached later: advantages (N,) or (N, L), loss_mask (default the completion mask), log-probs, extras."""

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

@dataclass(frozen=True)
class Sampling:
    """What ``collect`` draws each step: P prompts × G completions, and DAPO's dynamic sampling (GRPO's)."""

    num_generations: int
    prompts_per_step: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int | None
    seed: int
    dynamic_sampling: bool = False
    max_resample_rounds: int = 0


@dataclass(frozen=True)
class CollectStats:
    """What sampling saw, dropped groups included (for metrics)."""

    seen_rewards: tuple[float, ...]
    seen_per_fn: dict[str, tuple[float, ...]]
    groups: int
    zero_std_groups: int
    seen_steps: tuple[float, ...]  # every step reward of every sampled completion (process supervision)
    no_steps: int  # sampled completions without any step reward


def collect(policy: Policy, encode: Callable[[str | list[dict]], list[int]], decode: Callable[[list[int]], str],
            prompts: Callable[[int], list[Row]], scorer: Scorer, sampling: Sampling, *,
            seed: Callable[[int], int]) -> tuple[Rollout, CollectStats]:
    """Sample G completions of each prompt of ``prompts(round)`` (seeded by ``seed(round)``), score them and keep the
    groups; with ``dynamic_sampling`` only those whose outcome (with a process reward: step) rewards differ, resampling
    up to ``max_resample_rounds`` times until as many groups as round 0's prompts are kept."""
    G, informative_only, process = sampling.num_generations, sampling.dynamic_sampling, scorer.process_fn is not None
    kept: list[tuple[Scored, list, int, Row]] = []  # (its round's samples, their step rewards, group, example)
    seen, seen_steps, seen_fn = [], [], {name: [] for name in scorer.names}  # every sampled completion's rewards
    no_steps, zero_std, groups, want = 0, 0, 0, None
    params = SamplingParams(max_tokens=sampling.max_completion_length, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p)
    for round_ in range(1 + (sampling.max_resample_rounds if informative_only else 0)):
        exs = prompts(round_)
        want = len(exs) if want is None else want
        rows = [ex for ex in exs for _ in range(G)]
        scored = sample_and_score(policy, encode, decode, rows, scorer, params, seed(round_))
        result = scored.result
        steps = scorer.steps(rows, scored.texts, scored.samples.completions) if process else [None] * len(rows)
        seen += result.total
        for name, values in result.per_fn.items():
            seen_fn[name] += [float("nan") if v is None else float(v) for v in values]
        seen_steps += [r for s in steps if s is not None for r in s.rewards]
        no_steps += sum(s is None or not s.rewards for s in steps) if process else 0
        groups += len(exs)
        for g, ex in enumerate(exs):
            sl = slice(g * G, (g + 1) * G)
            zero_std += (flat := len(set(result.total[sl])) == 1)
            if process:
                flat = len({r for s in steps[sl] if s is not None for r in s.rewards}) <= 1
            if not (informative_only and flat):
                kept.append((scored, steps, g, ex))
        if len(kept) >= want:
            break
    kept = kept[:want]
    rows = [(sc, st, i) for sc, st, g, _ in kept for i in range(g * G, (g + 1) * G)]  # every kept completion
    batch = Batch.build([sc.prompt_ids[g * G] for sc, _, g, _ in kept], [j for j in range(len(kept)) for _ in range(G)],
                        [sc.samples.completions[i] for sc, _, i in rows], policy.pad_id)
    sampler_logp = torch.zeros(batch.completion_ids.shape)
    for j, (sc, _, i) in enumerate(rows):
        sampler_logp[j, : len(sc.samples.logprobs[i])] = torch.tensor(sc.samples.logprobs[i])
    per_fn = {name: torch.tensor([float("nan") if sc.result.per_fn[name][i] is None else sc.result.per_fn[name][i]
                                  for sc, _, i in rows], dtype=torch.float32) for name in scorer.names}
    return Rollout(
        batch=batch, examples=tuple(ex for *_, ex in kept), texts=tuple(sc.texts[i] for sc, _, i in rows),
        rewards=torch.tensor([sc.result.total[i] for sc, _, i in rows], dtype=torch.float32), rewards_per_fn=per_fn,
        truncated=torch.tensor([sc.samples.truncated[i] for sc, _, i in rows], dtype=torch.bool),
        sampler_logp=sampler_logp, steps=tuple(st[i] for _, st, i in rows) if process else None,
    ), CollectStats(tuple(seen), {k: tuple(v) for k, v in seen_fn.items()}, groups, zero_std, tuple(seen_steps),
                    no_steps)
