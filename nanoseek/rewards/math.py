"""Math reward: extract the final answer and check it against the gold with math-verify (symbolic equality,
so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` all match)."""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from math_verify import parse, verify

from nanoseek.rewards.countdown import extract_answer
from nanoseek.rewards.format import completion_text

_GSM8K = re.compile(r"####\s*([^\n]+)")
_EQUATION = re.compile(r"\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i, depth = text.index("{", start) + 1, 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(text: str) -> str | None:
    """The last ``<answer>…</answer>`` (narrowed to a ``\\boxed{}`` inside it), else the last ``\\boxed{…}``, else
    GSM8K's last ``#### 42``; None if none."""
    answer = extract_answer(text)
    if answer is not None:
        boxed = last_boxed(answer)
        return boxed if boxed is not None else answer
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    gsm = _GSM8K.findall(text)
    return gsm[-1].strip().replace(",", "") if gsm else None


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None  # math-verify uses signal.alarm


def _parse_answer(answer: str) -> list:
    """math-verify's parse of an answer read as LaTeX math; [] if it is not math."""
    answer = answer.strip()
    if not answer:
        return []
    kw = dict(fallback_mode="no_fallback", parsing_timeout=_timeout())
    return parse(f"${answer}$", **kw) or parse(answer, **kw)


def math_reward(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold (column ``answer``, else the final answer of
    ``solution``), else 0.0; None where math-verify cannot parse the gold."""
    gold_col = answer if answer is not None else solution
    if gold_col is None:
        raise ValueError("math_reward needs a dataset column 'answer' or 'solution' with the gold answers")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, map(str, gold_col)):
        gold_parsed = _parse_answer(extract_final_answer(gold) or gold)
        pred = extract_final_answer(completion_text(completion)) if gold_parsed else None
        pred_parsed = _parse_answer(pred) if pred is not None else []
        ok = bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=_timeout())
        rewards.append(float(ok) if gold_parsed else None)
    return rewards


def equations_hold(text: str) -> bool:
    """Every line with an ``=`` is one true step ``a op b = c`` (integers, op in + - * /), and there is one."""
    lines = [line for line in text.split("\n") if "=" in line]
    if not lines:
        return False
    for line in lines:
        m = _EQUATION.fullmatch(line)
        if m is None:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if op == "/" and b == 0 or {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b or 1)}[op] != c:
            return False
    return True


def equations_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion's worked steps are all true arithmetic (``equations_hold``), else 0.0."""
    return [1.0 if equations_hold(completion_text(c)) else 0.0 for c in completions]


math_reward.required_columns = (("answer", "solution"),)  # one of them (see nanoseek.rewards.required_columns)
