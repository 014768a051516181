"""Built-in tasks with verifiable answers: each makes (prompt, reference completion, gold answer) examples
and scores a completion. Train and held-out splits are disjoint by construction (a hash of the prompt
decides the split), so evaluation never sees a training prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str  # a correct completion, the SFT target
    answer: str  # the gold final answer the verifier checks against
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    name: str

    def example(self, rng: random.Random) -> Example:
        """Draw one example (either split)."""
        ...

    def score(self, completion: str, example: Example) -> float:
        """1.0 if the completion's final answer is correct, else 0.0."""
        ...


EVAL_FRACTION = 10  # one prompt in ten belongs to the held-out split


def in_eval_split(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % EVAL_FRACTION == 0


def examples(task: Task, n: int, split: str, seed: int = 0) -> list[Example]:
    """n examples of ``split`` ("train" or "eval"), deterministic in (task, split, seed)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task.name}/{split}/{seed}")
    want_eval = split == "eval"
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        ex = task.example(rng)
        tries += 1
        if in_eval_split(ex.prompt) == want_eval:
            out.append(ex)
        if tries > 200 * n + 10_000:
            raise RuntimeError(f"task {task.name!r} could not produce {n} {split} examples")
    return out


def get_task(name: str, **kwargs) -> Task:
    from nanoseek.tasks.arithmetic import ArithmeticTask

    tasks: dict[str, type] = {"arithmetic": ArithmeticTask}
    try:
        from nanoseek.tasks.countdown import CountdownTask

        tasks["countdown"] = CountdownTask
    except ImportError:
        pass
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(tasks))}")
    return tasks[name](**kwargs)
