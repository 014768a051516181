"""Countdown reward (TinyZero-style): the answer is an arithmetic expression that uses each given number exactly
once and evaluates to the target. Only + - * / over non-negative integer literals and parentheses are accepted:
the characters are checked, then Python's ``ast`` parses the expression and it is evaluated over exact
``Fraction``s, never with ``eval``."""

from __future__ import annotations

import ast
import itertools
import operator
import re
from collections import Counter
from fractions import Fraction

from nanoseek.rewards.format import completion_text

MAX_EXPRESSION_CHARS = 200  # countdown answers are short; anything longer is rejected before parsing
MAX_DIGITS = 12  # per integer literal: keeps every intermediate value small
MAX_DEPTH = 32  # parenthesis nesting

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _value(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        raise ValueError("'**' (power) is not allowed")
    if not (isinstance(node, ast.BinOp) and type(node.op) in _OPS):
        raise ValueError(f"expected a number or a binary + - * /, got {ast.unparse(node)!r}")
    left, right = _value(node.left), _value(node.right)
    if isinstance(node.op, ast.Div) and right == 0:
        raise ValueError("division by zero")
    return _OPS[type(node.op)](left, right)


def parse_expression(text: str) -> Fraction:
    """Exact value of an arithmetic expression over + - * / and parentheses; ValueError on anything else
    (other characters, '**', unary minus, division by zero, too long or too deeply nested)."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    bad = re.search(r"[^\d\s+\-*/()]", text)
    if bad is not None:
        raise ValueError(f"unexpected character {bad.group()!r}; only digits, + - * / and parentheses are allowed")
    if re.search(rf"\d{{{MAX_DIGITS + 1}}}", text):
        raise ValueError(f"a number has more than {MAX_DIGITS} digits")
    if max(itertools.accumulate({"(": 1, ")": -1}.get(c, 0) for c in text), default=0) > MAX_DEPTH:
        raise ValueError(f"parentheses nested deeper than {MAX_DEPTH}")
    try:  # one line, and no leading zeros (Python rejects "07")
        tree = ast.parse(re.sub(r"\b0+(?=\d)", "", " ".join(text.split())), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    return _value(tree.body)


def check_equation(expression: str, numbers: list[int], target: int) -> bool:
    """True iff ``expression`` (optionally written ``expr = target``) uses each of ``numbers`` exactly once
    (as a multiset) and equals ``target``. Invalid expressions are False, never an exception."""
    if "=" in expression:  # accept "25*4 - 3 = 97": check the left side, the right side must be the target
        expression, _, rhs = expression.partition("=")
        if rhs.strip() != str(target):
            return False
    try:
        value = parse_expression(expression)
    except ValueError:
        return False
    used = map(int, re.findall(r"\d+", expression))  # the parse accepted it: its numbers are its digit runs
    return value == target and Counter(used) == Counter(int(n) for n in numbers)


def extract_answer(completion: str) -> str | None:
    """Content of the last ``<answer>…</answer>`` in ``completion`` (stripped), else None."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def countdown_reward(prompts, completions, numbers, target, **kwargs) -> list[float]:
    """1.0 if the last ``<answer>`` holds a valid equation over the column ``numbers`` hitting ``target``, else 0.0."""
    if not (len(completions) == len(numbers) == len(target)):
        raise ValueError(f"countdown_reward: got {len(completions)} completions but {len(numbers)} 'numbers' and "
                         f"{len(target)} 'target' entries; pass one per completion")
    answers = [extract_answer(completion_text(c)) for c in completions]
    return [1.0 if a is not None and check_equation(a, list(nums), int(tgt)) else 0.0
            for a, nums, tgt in zip(answers, numbers, target)]

