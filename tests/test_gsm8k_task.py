"""The GSM8K-style task: answers recomputed from the prompt's numbers, worked solutions that check line by line,
disjoint deterministic splits, and a score that agrees with the ``math`` reward."""

import re

import pytest

from nanoseek.rewards.math import equations_hold, math_reward
from nanoseek.tasks import distinct_examples, examples, get_task, in_eval_split
from nanoseek.tasks.gsm8k import GSM8KTask

FORMULAS = {  # hand-written from the templates' wording
    "buy_give": lambda a, b, c: a + b - c,
    "bags_use": lambda a, b, c: a * b - c,
    "times_more": lambda a, b: a + a * b,
    "boxes": lambda a, b, c, d: (b + c) * a - d,
    "share": lambda total, k, b: total // k + b,
    "change": lambda a, b, m: m - a * b,
}


@pytest.mark.parametrize("max_number", [9, 4])
def test_answers_recomputed_and_solutions_check(max_number):
    task = GSM8KTask(max_number=max_number)
    seen = set()
    for ex in examples(task, 600, "train", seed=0):
        template, numbers = ex.meta["template"], ex.meta["numbers"]
        seen.add(template)
        assert [int(x) for x in re.findall(r"\d+", ex.prompt)] == list(numbers)  # the prompt states them in order
        assert ex.answer == str(FORMULAS[template](*numbers)) and int(ex.answer) >= 0
        *work, last = ex.completion.split("\n")
        assert last == f"#### {ex.answer}" and 2 <= len(work) <= 3
        for line in work:  # each worked step is true arithmetic
            x, op, y, z = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line).groups()
            assert int(z) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y),
                              "/": int(x) / int(y)}[op]
            assert int(z) <= (max_number + 3) * max_number
        assert work[-1].endswith(f"={ex.answer}")
        if template == "share":
            assert numbers[0] % numbers[1] == 0
        assert task.score(ex.completion, ex) == 1.0 and equations_hold(ex.completion)
    assert seen == set(FORMULAS)


def test_score_and_math_reward_agree():
    task = get_task("gsm8k")
    exs = examples(task, 50, "eval", seed=3)
    wrong = [ex.completion.rsplit("#### ", 1)[0] + f"#### {int(ex.answer) + 1}" for ex in exs]
    for completions, value in ((([ex.completion for ex in exs]), 1.0), (wrong, 0.0)):
        assert [task.score(c, ex) for c, ex in zip(completions, exs)] == [value] * 50
        assert math_reward(None, completions, answer=[ex.completion for ex in exs]) == [value] * 50
    ex = exs[0]
    assert task.score(f"#### {ex.answer}\nmore text #### 999", ex) == 0.0  # the last #### counts
    assert task.score("no answer here", ex) == 0.0


def test_splits_disjoint_and_deterministic():
    task = get_task("gsm8k")
    train = distinct_examples(task, 3000, "train", seed=0)
    held = distinct_examples(task, 300, "eval", seed=0)
    assert len(train) == 3000 and len(held) == 300
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(in_eval_split(e.prompt, task) for e in held) and not any(in_eval_split(e.prompt, task) for e in train)
    assert examples(task, 20, "train", seed=5) == examples(task, 20, "train", seed=5)
    assert examples(task, 20, "train", seed=5) != examples(task, 20, "train", seed=6)


def test_validation():
    with pytest.raises(ValueError, match="max_number"):
        GSM8KTask(max_number=2)
