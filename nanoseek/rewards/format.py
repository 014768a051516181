"""DeepSeek-R1's output template (arXiv 2501.12948 §2.2.2, Table 1): the reasoning in ``<think>…</think>``
followed by the final answer in ``<answer>…</answer>``; and GSM8K's: worked lines, then ``#### N`` last."""

from __future__ import annotations

import re

# strict: the whole completion is exactly one think block then one answer block (whitespace between/around only)
# and a non-empty answer (the lookahead)
_STRICT = re.compile(r"\A\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*<answer>(?=\s*(?!</answer>)\S)"
                     r"((?:(?!</?think>|</?answer>).)*)</answer>\s*\Z", re.DOTALL)
# lenient: a think block followed (anywhere later) by a non-empty answer block
_LENIENT = re.compile(r"<think>.*?</think>.*?<answer>\s*\S.*?</answer>", re.DOTALL)
# GSM8K: one or more non-empty lines of work without "####", then a last line "#### N" (an integer)
_GSM8K = re.compile(r"\A\s*(?:[^\n#]*[^\s#][^\n#]*\n)+####[ \t]*-?\d[\d,]*\s*\Z")


def completion_text(completion) -> str:
    """TRL passes completions as strings, or as chat messages ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _matching(name: str, pattern: re.Pattern, doc: str):
    """A TRL-style reward: 1.0 for the completions ``pattern`` matches (searched), else 0.0."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]

    reward.__name__, reward.__qualname__, reward.__doc__ = name, name, doc
    return reward


format_reward = _matching("format_reward", _STRICT, "R1's strict template, exactly ``<think>…</think><answer>…"
                          "</answer>`` (no text outside, no nested or repeated tags, a non-empty answer).")
lenient_format_reward = _matching("lenient_format_reward", _LENIENT,
                                  "A think block followed by a non-empty answer block anywhere in the completion.")
gsm8k_format_reward = _matching("gsm8k_format_reward", _GSM8K,
                                "GSM8K's format: worked lines, then ``#### N`` (an integer) as the last line.")
