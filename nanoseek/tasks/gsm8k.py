"""GSM8K-style word problems (arXiv 2110.14168) from templates with small numbers, two or three steps, answers
in GSM8K's format, one step per line then ``#### N``; prompt ``"Tom has 5 apples, buys 3 more and gives away 2.
How many does he have now?"``, completion ``"5+3=8\\n8-2=6\\n#### 6"``. The score reads only the final ``#### N``."""

from __future__ import annotations

import random

from nanoseek.rewards.math import extract_final_answer
from nanoseek.tasks.base import Example

NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Eva", "she")]
ITEMS = ["apples", "pens", "cards", "eggs", "books", "shells"]
# template -> (prompt, its numbers in order, steps (x, op, y) over the values drawn, "_" the previous step's value)
TEMPLATES = {
    "buy_give": ("{name} has {a} {item}, buys {b} more and gives away {c}. How many does {he} have now?",
                 "abc", [("a", "+", "b"), ("_", "-", "c")]),
    "bags_use": ("{name} buys {a} bags of {b} {item} each and uses {c}. How many are left?",
                 "abc", [("a", "*", "b"), ("_", "-", "c")]),
    "times_more": ("{name} has {a} {item}. {other} has {b} times as many. How many in all?",
                   "ab", [("a", "*", "b"), ("a", "+", "_")]),
    "boxes": ("A box holds {a} {item}. {name} fills {b} boxes, then {c} more, and loses {d}. How many now?",
              "abcd", [("b", "+", "c"), ("_", "*", "a"), ("_", "-", "d")]),
    "share": ("{name} shares {t} {item} among {k} friends, then gives each {b} more. How many each?",
              "tkb", [("t", "/", "k"), ("_", "+", "b")]),
    "change": ("A pen costs {a} dollars. {name} buys {b} pens and pays {m}. What is the change?",
               "abm", [("a", "*", "b"), ("m", "-", "_")]),
}


class GSM8KTask:
    name = "gsm8k"
    templates = tuple(TEMPLATES)

    def __init__(self, max_number: int = 9):
        if not 3 <= max_number <= 20:
            raise ValueError(f"GSM8KTask needs 3 <= max_number <= 20, got {max_number}")
        self.max_number = max_number

    def example(self, rng: random.Random) -> Example:
        n = self.max_number
        (name, he), (other, _) = rng.sample(NAMES, 2)
        item, template = rng.choice(ITEMS), rng.choice(self.templates)
        a, b, k = rng.randint(2, n), rng.randint(2, n), rng.randint(2, n)
        v = dict(a=a, b=b, k=k, t=a * k, m=(a * b // 10 + 1) * 10)  # t divides evenly by k; m: the next ten up
        if template in ("buy_give", "bags_use"):
            v["c"] = rng.randint(1, a + b if template == "buy_give" else a * b)
        elif template == "boxes":
            v["c"] = rng.randint(1, 3)
            v["d"] = rng.randint(1, (b + v["c"]) * a)
        prompt_format, numbers, steps = TEMPLATES[template]
        lines = []
        for x, op, y in steps:
            x, y = v[x], v[y]
            v["_"] = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
            lines.append(f"{x}{op}{y}={v['_']}")
        answer = str(v["_"])
        completion = "\n".join(lines) + f"\n#### {answer}"
        prompt = prompt_format.format(name=name, he=he, other=other, item=item, **v)
        return Example(prompt, completion, answer, {"template": template, "numbers": tuple(v[z] for z in numbers)})

    def score(self, completion: str, example: Example) -> float:
        """1.0 iff the completion's final answer (``extract_final_answer``) is the gold number."""
        pred = extract_final_answer(completion)
        return float(pred is not None and pred.strip() == example.answer)
