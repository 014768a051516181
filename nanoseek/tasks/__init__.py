"""Built-in tasks with verifiable answers: (prompt, reference, gold answer) examples, a score, disjoint splits."""

from __future__ import annotations

from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Example, Task, distinct_examples, draw, examples, in_eval_split, task_reward
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.gsm8k import GSM8KTask

TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "gsm8k": GSM8KTask}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Example", "Task", "distinct_examples", "draw", "examples", "get_task",
           "in_eval_split", "task_reward"]
