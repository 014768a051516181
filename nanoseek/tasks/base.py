"""``Example``, the ``Task`` protocol, the held-out split, draws, and ``task_reward`` (a score as a TRL reward)."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from nanoseek.rewards.format import completion_text


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str  # a correct completion, the SFT target
    answer: str  # the gold final answer the verifier checks against
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    name: str
    def example(self, rng: random.Random) -> Example: ...  # one example (either split)
    def score(self, completion: str, example: Example) -> float: ...  # 1.0 if the final answer is right, else 0.0


def in_eval_split(prompt: str, task: Task | None = None, fraction: int | None = None) -> bool:
    """Whether ``prompt`` is held out: by its hash, one in ``fraction`` (default ``task.eval_fraction``, else 10)."""
    fraction = fraction or getattr(task, "eval_fraction", 10)
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % fraction == 0


def _draws(task: Task, split: str, seed: int | str) -> Iterator[tuple[Example, bool]]:
    """Endless draws of (example, whether it belongs to ``split``), deterministic in (task, split, seed)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task.name}/{split}/{seed}")
    while True:
        ex = task.example(rng)
        yield ex, in_eval_split(ex.prompt, task) == (split == "eval")


def draw(task: Task, split: str, seed: int | str = 0, patience: int = 10_000) -> Iterator[Example]:
    """Endless examples of ``split`` (repeats included); RuntimeError after ``patience`` draws in a row outside it."""
    misses = 0
    for ex, in_split in _draws(task, split, seed):
        if in_split:
            misses = 0
            yield ex
        elif (misses := misses + 1) > patience:
            raise RuntimeError(f"task {task.name!r} produced no {split} example in {patience} draws")


def examples(task: Task, n: int, split: str, seed: int | str = 0) -> list[Example]:
    return list(itertools.islice(draw(task, split, seed), n))


def distinct_examples(task: Task, n: int, split: str, seed: int = 0, patience: int = 10_000) -> list[Example]:
    """Up to n examples of ``split`` with distinct prompts, in draw order, until ``patience`` draws bring none new."""
    seen: dict[str, Example] = {}
    since_new = 0
    for ex, in_split in _draws(task, split, seed):
        if len(seen) == n or since_new == patience:
            break
        since_new += 1
        if in_split and ex.prompt not in seen:
            seen[ex.prompt], since_new = ex, 0
    if not seen:
        raise RuntimeError(f"task {task.name!r} produced no {split} examples in {patience} draws")
    return list(seen.values())


def task_reward(task: Task) -> Callable[..., list[float]]:
    """A TRL-style reward: ``task.score`` of each completion against column ``example``, else prompt and ``answer``."""

    def reward(prompts, completions, example=None, answer=None, **kwargs) -> list[float]:
        if example is None:
            if answer is None:
                raise ValueError(f"task reward {task.name!r} needs a dataset column 'example' or 'answer'")
            example = [Example(str(p), "", str(a)) for p, a in zip(prompts, answer)]
        return [float(task.score(completion_text(c), ex)) for c, ex in zip(completions, example)]

    reward.__name__ = f"{task.name}_reward"
    reward.required_columns = (("example", "answer"),)
    return reward
