"""Countdown reward (TinyZero-style): the answer is an arithmetic expression that uses each given number exactly
once and evaluates to the target. Parsed with a small recursive-descent parser over exact ``Fraction``s —
never ``eval``.

Grammar (only + - * /, parentheses, non-negative integer literals, unary minus is rejected):

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := INT | '(' expr ')'
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from nanoseek.rewards.format import completion_text

MAX_EXPRESSION_CHARS = 200  # countdown answers are short; anything longer is rejected before parsing
MAX_DIGITS = 12  # per integer literal: keeps every intermediate value small
MAX_DEPTH = 32  # parenthesis nesting

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _tokenize(text: str) -> list[str]:
    tokens = []
    for number, op in _TOKEN.findall(text):
        if number:
            if len(number) > MAX_DIGITS:
                raise ValueError(f"number {number[:20]}... has more than {MAX_DIGITS} digits")
            tokens.append(number)
        elif op.strip():
            if op not in "+-*/()":
                raise ValueError(f"unexpected character {op!r}; only digits, + - * / and parentheses are allowed")
            tokens.append(op)
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            value += sign * self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            if op == "*" and self.peek() == "*":
                raise ValueError("'**' (power) is not allowed")
            rhs = self.factor(depth)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ValueError("division by zero")
            else:
                value /= rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.take()
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ValueError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ValueError("missing ')'")
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ValueError(f"expected a number or '(', got {tok!r}")


def parse_expression(text: str) -> Fraction:
    """Exact value of an arithmetic expression over + - * / and parentheses; ValueError on anything else
    (other characters, '**', unary minus, division by zero, too long or too deeply nested)."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(_tokenize(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} after the end of the expression")
    return value


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
    """TRL-style reward: 1.0 if the last ``<answer>`` holds a valid equation over ``numbers`` hitting ``target``,
    else 0.0. ``numbers`` and ``target`` are dataset columns (one entry per completion)."""
    if not (len(completions) == len(numbers) == len(target)):
        raise ValueError(
            f"countdown_reward: got {len(completions)} completions but {len(numbers)} 'numbers' and "
            f"{len(target)} 'target' entries; pass one per completion"
        )
    rewards = []
    for completion, nums, tgt in zip(completions, numbers, target):
        answer = extract_answer(completion_text(completion))
        rewards.append(1.0 if answer is not None and check_equation(answer, list(nums), int(tgt)) else 0.0)
    return rewards

