"""Two-operand integer arithmetic: prompt ``"37+48="``, completion ``"85"``."""

from __future__ import annotations

import random
import re

from nanoseek.tasks.base import Example


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, max_operand: int = 99, ops: str = "+-"):
        if max_operand < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError("ArithmeticTask needs max_operand >= 1 and ops drawn from '+-*'")
        self.max_operand, self.ops = max_operand, ops

    def example(self, rng: random.Random) -> Example:
        a, b, op = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand), rng.choice(self.ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Example(prompt=f"{a}{op}{b}=", completion=str(value), answer=str(value))

    def score(self, completion: str, example: Example) -> float:
        m = re.match(r"\s*(-?\d+)", completion)
        return float(m is not None and m.group(1) == example.answer)
