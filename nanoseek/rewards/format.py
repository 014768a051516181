"""DeepSeek-R1's output template (arXiv 2501.12948 §2.2.2, Table 1): the reasoning in ``<think>…</think>``
followed by the final answer in ``<answer>…</answer>``; and GSM8K's: worked lines, then ``#### N`` last."""

from __future__ import annotations

import re

# strict: the whole completion is exactly one think block then one answer block (whitespace between/around only)
_STRICT = re.compile(r"\A\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*"
                     r"<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*\Z", re.DOTALL)
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


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for exactly ``<think>…</think><answer>…</answer>``, a non-empty answer, no other text or tags; else 0.0."""
    matches = [_STRICT.match(completion_text(c)) for c in completions]
    return [1.0 if m is not None and m.group(2).strip() else 0.0 for m in matches]


def lenient_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if a think block is followed by a non-empty answer block anywhere in the completion, else 0.0."""
    return [1.0 if _LENIENT.search(completion_text(c)) else 0.0 for c in completions]


def gsm8k_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for GSM8K's format (worked lines, then ``#### N`` as the last line, N an integer), else 0.0."""
    return [1.0 if _GSM8K.match(completion_text(c)) else 0.0 for c in completions]
