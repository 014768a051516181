"""The Countdown task: well-formed examples, a verifier that accepts every valid equation (not only the
reference) and rejects everything else, disjoint splits."""

import itertools
import random

import pytest

from nanoseek.tasks import Example, distinct_examples, examples, get_task, in_eval_split
from nanoseek.tasks.countdown import CountdownTask


def test_registered_and_validated():
    assert isinstance(get_task("countdown"), CountdownTask)
    with pytest.raises(ValueError, match="ops"):
        CountdownTask(ops="+/")
    with pytest.raises(ValueError, match="n_numbers"):
        CountdownTask(n_numbers=1)


@pytest.mark.parametrize("kwargs", [{}, {"n_numbers": 4, "max_number": 12, "max_target": 200}])
def test_reference_completion_is_correct(kwargs):
    task = CountdownTask(**kwargs)
    n = task.n_numbers
    for ex in examples(task, 300, "train", seed=1):
        numbers_text, target_text = ex.prompt[:-1].split(":")
        numbers = [int(x) for x in numbers_text.split(",")]
        assert numbers == sorted(numbers) and len(numbers) == n
        assert all(1 <= x <= task.max_number for x in numbers)
        assert 0 <= int(target_text) <= task.max_target and ex.answer == target_text
        assert sorted(int(x) for x in ex.completion.replace("*", " ").replace("+", " ").replace("-", " ").split()) \
            == numbers
        assert task.score(ex.completion, ex) == 1.0


def test_verifier_accepts_any_valid_equation_and_rejects_the_rest():
    task = CountdownTask()
    ex = Example("3,5,7:26=", "7*5-9", "26")  # hand-derived: 5*7-9 is not usable (no 9); 3*7+5 = 26
    for good in ("3*7+5", "5+7*3", "7*3+5", " 5 + 3*7 \n", "(3*7)+5", "5+3*7\ntrailing text"):
        assert task.score(good, ex) == 1.0, good
    for bad in ("3*7+6", "3*7", "3*7+5+0", "3*7+5*1", "7*7-23", "26", "", "abc", "3*7++5", "-3*7+5",
                "__import__('os')", "3**7", "5+3*7=25"):
        assert task.score(bad, ex) == 0.0, bad
    assert task.score("5+3*7=26", ex) == 1.0  # "expr = target" is accepted when the target matches
    assert task.score("(8-5)*5", Example("5,7,8:15=", "", "15")) == 0.0  # right value, 5 reused, 7 unused
    assert task.score("(5*7-8)/9", Example("5,7,8,9:3=", "", "3")) == 1.0  # division, parentheses


def test_most_problems_have_several_solutions():
    """The premise of the demo: SFT shows one solution, the reward accepts all of them."""
    task = CountdownTask()
    several = 0
    exs = examples(task, 200, "train", seed=2)
    for ex in exs:
        numbers = [int(x) for x in ex.prompt.split(":")[0].split(",")]
        sols = {str(p[0]) + "".join(o + str(x) for o, x in zip(ops, p[1:]))
                for p in itertools.permutations(numbers) for ops in itertools.product("+-*", repeat=2)}
        several += sum(task.score(s, ex) for s in sols) > 1
    assert several / len(exs) > 0.9


def test_splits_are_disjoint_and_deterministic():
    task = CountdownTask()
    train = {ex.prompt for ex in examples(task, 2000, "train", seed=0)}
    held_out = examples(task, 500, "eval", seed=0)
    assert not train & {ex.prompt for ex in held_out}
    assert held_out == examples(task, 500, "eval", seed=0)
    assert task.example(random.Random(5)) == task.example(random.Random(5))


def test_malformed_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="not of the form"):
        CountdownTask().score("1+2", Example("1+2=", "", "3"))


def test_distinct_held_out_set_is_the_whole_split():
    """Countdown's held-out split is small: enumerate it by brute force (every ordered triple and operator pair),
    and check that the demo's held-out set is (nearly) that split, without repeats, and that the ordinary draw
    of 1000 held-out examples repeats problems (what the distinct set avoids)."""
    task = CountdownTask()
    split = set()
    for order in itertools.product(range(1, task.max_number + 1), repeat=task.n_numbers):
        for ops in itertools.product(task.ops, repeat=task.n_numbers - 1):
            value = eval(str(order[0]) + "".join(o + str(n) for o, n in zip(ops, order[1:])))  # digits and +-* only
            prompt = ",".join(map(str, sorted(order))) + f":{value}="
            if 0 <= value <= task.max_target and in_eval_split(prompt, task):
                split.add(prompt)
    held_out = distinct_examples(task, 1000, "eval", seed=0)
    prompts = [ex.prompt for ex in held_out]
    assert len(prompts) == len(set(prompts)) and set(prompts) <= split
    assert len(prompts) >= 0.99 * len(split)  # stops after 10,000 draws without a new problem: the rarest may miss
    assert held_out == distinct_examples(task, 1000, "eval", seed=0)
    assert held_out[:50] == distinct_examples(task, 50, "eval", seed=0)  # a smaller set is a prefix
    assert len({ex.prompt for ex in examples(task, 1000, "eval", seed=0)}) < len(prompts) < 1000
    train = distinct_examples(get_task("arithmetic"), 300, "train", seed=3)
    assert len({ex.prompt for ex in train}) == 300
