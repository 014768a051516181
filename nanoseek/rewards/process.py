"""Process rewards (DeepSeekMath arXiv:2402.03300 §4.1.3): a score for each step of a completion, placed on the
completion token that ends the step, so GRPO can give each token its own advantage.
``fn(prompts, completions, completion_ids, **columns) -> list[StepRewards | None]``, the columns including
``tokenizer``: ``StepRewards(rewards, ends)`` gives step j's reward and the index in ``completion_ids[i]`` (eos
included when sampled) of its last token; None means no steps (the completion gets zero advantage)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class StepRewards:
    rewards: list[float]  # (S,) one reward per step
    ends: list[int]  # (S,) completion token index of each step's last token, non-decreasing


def check_steps(steps, n_tokens: int, sample: int, name: str = "process reward") -> StepRewards | None:
    """A process reward's value for completion ``sample`` (``n_tokens`` long) with plain float / int lists:
    finite rewards, one non-decreasing end inside the completion per step; else ValueError naming the sample."""
    if steps is None:
        return None
    where = f"{name}: sample {sample}"
    if not isinstance(steps, StepRewards):
        raise ValueError(f"{where}: return StepRewards(rewards, ends) or None, got {type(steps).__name__}")
    try:
        rewards, ends = [float(r) for r in steps.rewards], [int(e) for e in steps.ends]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: rewards must be a list of numbers and ends a list of ints ({e})") from None
    if any(e != raw for e, raw in zip(ends, steps.ends)):
        raise ValueError(f"{where}: step ends must be integer token positions, got {list(steps.ends)}")
    if len(rewards) != len(ends):
        raise ValueError(f"{where}: {len(rewards)} step rewards but {len(ends)} step ends (need one end per step)")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"{where}: step rewards must be finite, got {rewards}")
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{where}: step ends must be non-decreasing token positions, got {ends}")
    if ends and (ends[0] < 0 or ends[-1] >= n_tokens):
        raise ValueError(f"{where}: step ends {ends} must lie in [0, {n_tokens}) (the completion's tokens)")
    return StepRewards(rewards, ends)


def token_of_char(ids: Sequence[int], decode: Callable[[list[int]], str], c: int) -> int | None:
    """Index of the token of ``ids`` that emits character ``c`` of ``decode(ids)`` (the first k with
    len(decode(ids[:k+1])) > c, by binary search), or None past the end."""
    k = bisect.bisect_right(range(len(ids)), c, key=lambda k: len(decode(list(ids[: k + 1]))))
    return k if k < len(ids) else None


def arithmetic_process_reward(prompts, completions, completion_ids, example=None, answer=None, tokenizer=None,
                              **kwargs) -> list[StepRewards]:
    """Per-character steps for ``arithmetic`` (``"37+48="`` -> ``"85"``): step j < len(gold) scores answer character j
    (after leading whitespace), a last step the end of the number; each ends on the token that decided it (eos for
    the end of the text), stopping at the first wrong or undecided step, where a wrong answer's advantage falls."""
    if tokenizer is None:
        raise ValueError("arithmetic process reward needs the 'tokenizer' column to map characters to tokens")
    if answer is None:
        if example is None:
            raise ValueError("arithmetic process reward needs a dataset column 'answer' or 'example'")
        answer = [ex.answer for ex in example]
    out = []
    for ids, gold in zip(completion_ids, answer):
        ids, gold = list(ids), str(gold)
        text = tokenizer.decode(ids)
        start = len(text) - len(text.lstrip())
        after_text = (token_of_char(ids, tokenizer.decode, len(text) - 1) + 1) if text else 0
        rewards, ends = [], []
        for j in range(len(gold) + 1):
            c = start + j
            got = text[c] if c < len(text) else None  # None: the text ended here
            ok = got == gold[j] if j < len(gold) else got is None or not got.isdigit()
            end = token_of_char(ids, tokenizer.decode, c) if got is not None else after_text
            if end is None or end >= len(ids):
                break  # no token decided this step
            rewards.append(float(ok))
            ends.append(end)
            if not ok:
                break
        out.append(StepRewards(rewards, ends))
    return out


PROCESS_REWARD_FNS: dict[str, Callable[..., list]] = {"arithmetic": arithmetic_process_reward}
