"""Countdown, character-level: reach a target from given numbers with + - * (each number once). Prompt ``"5,7,9:26="``
(numbers sorted), completion ``"7*5-9"``: the reference is ONE solution; the verifier (``check_equation``) accepts any
expression of the numbers hitting the target (any order, ``/``, parentheses): the gap where RL can beat SFT."""

from __future__ import annotations

import random
import re

from nanoseek.rewards.countdown import check_equation, parse_expression
from nanoseek.tasks.base import Example

_PROMPT = re.compile(r"^(\d+(?:,\d+)*):(\d+)=$")


class CountdownTask:
    name = "countdown"
    # one problem in four is held out: the default task has only 1345 problems, and a tenth (129) would make
    # held-out accuracy too coarse to compare checkpoints (95% CIs of ±8 points; a quarter gives 316 problems)
    eval_fraction = 4

    def __init__(self, n_numbers: int = 3, max_number: int = 9, max_target: int = 99, ops: str = "+-*"):
        if n_numbers < 2 or max_number < 1 or max_target < 0 or not ops or set(ops) - set("+-*"):
            raise ValueError("CountdownTask needs n_numbers >= 2, max_number >= 1, max_target >= 0, ops from '+-*'")
        self.n_numbers, self.max_number, self.max_target, self.ops = n_numbers, max_number, max_target, ops

    def example(self, rng: random.Random) -> Example:
        while True:  # rejection-sample expressions until the value is a target in [0, max_target]
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            order = rng.sample(numbers, len(numbers))
            ops = [rng.choice(self.ops) for _ in range(self.n_numbers - 1)]
            expression = str(order[0]) + "".join(op + str(n) for op, n in zip(ops, order[1:]))
            target = int(parse_expression(expression))  # +-* over integers: exact, integral
            if 0 <= target <= self.max_target:
                break
        prompt = ",".join(map(str, sorted(numbers))) + f":{target}="
        return Example(prompt, expression, str(target), {"numbers": sorted(numbers), "target": target})

    def score(self, completion: str, example: Example) -> float:
        """1.0 iff the completion's first line is an equation over the prompt's numbers that hits the target."""
        m = _PROMPT.match(example.prompt)
        if m is None:
            raise ValueError(f"countdown prompt {example.prompt!r} is not of the form 'a,b,c:target='")
        numbers = [int(x) for x in m.group(1).split(",")]
        answer = completion.strip().split("\n", 1)[0].strip()
        return float(bool(answer) and check_equation(answer, numbers, int(m.group(2))))
