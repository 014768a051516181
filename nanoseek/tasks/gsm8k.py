"""GSM8K-style word problems made by the code: templates filled with names, items and small numbers, two or three
steps of arithmetic, answers in GSM8K's format (arXiv 2110.14168): a short worked solution, one step per line,
then ``#### N``::

    prompt:     "Tom has 5 apples, buys 3 more and gives away 2. How many does he have now?"
    completion: "5+3=8\\n8-2=6\\n#### 6"

Prompts are short (under 90 characters) and numbers small (operands up to n = ``max_number``, default 9; every
value a non-negative integer, at most (n+3)·n = 108), so a tiny character-level model learns the format and some
of the arithmetic in minutes. The completion is one correct solution; the score (and the ``math`` reward) reads
only the final ``#### N``.
"""

from __future__ import annotations

import random

from nanoseek.rewards.math import extract_final_answer
from nanoseek.tasks.base import Example

NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Eva", "she")]
ITEMS = ["apples", "pens", "cards", "eggs", "books", "shells"]


def _step(x: int, op: str, y: int) -> tuple[str, int]:
    """One solution line ``"x+y=z"`` and its value z."""
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
    return f"{x}{op}{y}={value}", value


class GSM8KTask:
    name = "gsm8k"
    # the templates' names, each with its numbers' formula (the tests recompute answers from these)
    templates = ("buy_give", "bags_use", "times_more", "boxes", "share", "change")

    def __init__(self, max_number: int = 9):
        if not 3 <= max_number <= 20:
            raise ValueError(f"GSM8KTask needs 3 <= max_number <= 20, got {max_number}")
        self.max_number = max_number

    def example(self, rng: random.Random) -> Example:
        n = self.max_number
        (name, he), (other, _) = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        template = rng.choice(self.templates)
        a, b, k = rng.randint(2, n), rng.randint(2, n), rng.randint(2, n)
        if template == "buy_give":  # a + b - c
            c = rng.randint(1, a + b)
            numbers = (a, b, c)
            prompt = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many does {he} have now?"
            lines = [_step(a, "+", b)]
            lines.append(_step(lines[-1][1], "-", c))
        elif template == "bags_use":  # a * b - c
            c = rng.randint(1, a * b)
            numbers = (a, b, c)
            prompt = f"{name} buys {a} bags of {b} {item} each and uses {c}. How many are left?"
            lines = [_step(a, "*", b)]
            lines.append(_step(lines[-1][1], "-", c))
        elif template == "times_more":  # a + a * b
            numbers = (a, b)
            prompt = f"{name} has {a} {item}. {other} has {b} times as many. How many in all?"
            lines = [_step(a, "*", b)]
            lines.append(_step(a, "+", lines[-1][1]))
        elif template == "boxes":  # (b + c) * a - d, three steps
            c = rng.randint(1, 3)
            d = rng.randint(1, (b + c) * a)
            numbers = (a, b, c, d)
            prompt = f"A box holds {a} {item}. {name} fills {b} boxes, then {c} more, and loses {d}. How many now?"
            lines = [_step(b, "+", c)]
            lines.append(_step(lines[-1][1], "*", a))
            lines.append(_step(lines[-1][1], "-", d))
        elif template == "share":  # a * k / k + b: a total that divides evenly
            total = a * k
            numbers = (total, k, b)
            prompt = f"{name} shares {total} {item} among {k} friends, then gives each {b} more. How many each?"
            lines = [_step(total, "/", k)]
            lines.append(_step(lines[-1][1], "+", b))
        else:  # change: m - a * b, paying with the next ten above the price
            m = (a * b // 10 + 1) * 10
            numbers = (a, b, m)
            prompt = f"A pen costs {a} dollars. {name} buys {b} pens and pays {m}. What is the change?"
            lines = [_step(a, "*", b)]
            lines.append(_step(m, "-", lines[-1][1]))
        answer = str(lines[-1][1])
        completion = "\n".join(text for text, _ in lines) + f"\n#### {answer}"
        return Example(prompt, completion, answer, {"template": template, "numbers": numbers})

    def score(self, completion: str, example: Example) -> float:
        """1.0 iff the completion's final answer (its last ``#### N``, as the ``math`` reward reads it) is the
        gold number."""
        pred = extract_final_answer(completion)
        return float(pred is not None and pred.strip() == example.answer)
