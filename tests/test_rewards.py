"""Reward functions: hand-checked values, the safe countdown parser, TRL-signature calls, and reward functions
that fail (raise, hang, a wrong number of values, NaN): the error naming the function and the row, or skipped."""

import logging
import math
import time
from fractions import Fraction

import pytest

from nanoseek.rewards import REWARD_FNS, RewardError, SkipFailures, check_computed, compute_rewards, get_reward_fn
from nanoseek.rewards.code import code_reward, extract_code
from nanoseek.rewards.countdown import check_equation, countdown_reward, extract_answer, parse_expression
from nanoseek.rewards.format import format_reward, lenient_format_reward
from nanoseek.rewards.math import extract_final_answer, last_boxed, math_reward
from nanoseek.rewards.sandbox import SandboxUnavailable, require_bwrap
from nanoseek.tasks import examples, get_task, task_reward

TRL_KW = dict(completion_ids=[[1, 2]], trainer_state=None)  # extra kwargs TRL passes; must be accepted


# ---- countdown -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("1 + 2 * 3", Fraction(7)), ("(1 + 2) * 3", Fraction(9)), ("7 / 2", Fraction(7, 2)), ("10 - 4 - 3", Fraction(3)),
    ("100 / 10 / 5", Fraction(2)), ("((((5))))", Fraction(5)), ("2*(3+4)-6/4", Fraction(25, 2)),
    ("1/3 + 1/3 + 1/3", Fraction(1)),
])
def test_parse_expression_exact_values(text, value):
    assert parse_expression(text) == value


@pytest.mark.parametrize("text, msg", [
    ("2 ** 10", "power"), ("1 / 0", "division by zero"), ("5 / (3 - 3)", "division by zero"), ("-1 + 2", "got '-1'"),
    ("1 +", "not an expression"), ("(1 + 2", "never closed"), ("1 + 2)", "unmatched"),
    ("__import__('os')", "unexpected character"),
    ("2 ^ 3", "unexpected character"), ("1.5 + 2", "unexpected character"), ("9" * 13, "digits"),
    ("1+" * 150 + "1", "longer than"), ("(" * 40 + "1" + ")" * 40, "nested"), ("", "not an expression"),
    ("3 4", "not an expression"),
])
def test_parse_expression_rejects(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_expression(text)


def test_parse_expression_rejects_absurd_input_fast():
    t = time.perf_counter()
    for text in ("9" * 10**6, "(" * 10**5, "1" + "*99" * 10**5):
        with pytest.raises(ValueError):
            parse_expression(text)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("expr, numbers, target, ok", [
    ("25 * 4 - 3", [3, 4, 25], 97, True),
    ("(25 - 4) * 3", [25, 4, 3], 63, True),
    ("25 * 4 - 3 = 97", [3, 4, 25], 97, True),
    ("25 * 4 - 3 = 98", [3, 4, 25], 97, False),  # the stated result must be the target
    ("25 * 4", [3, 4, 25], 100, False),  # 3 unused
    ("25 * 4 - 3 - 3", [3, 4, 25], 94, False),  # 3 used twice
    ("3 + 3", [3, 3], 6, True),  # duplicates in the multiset
    ("6 / 4 * 2", [6, 4, 2], 3, True),  # exact fractions
    ("6 / 4", [6, 4], 1, False),  # 1.5 is not 1 (no integer truncation)
    ("1 / 0 + 5", [1, 0, 5], 5, False),
    ("import os", [1], 1, False),
])
def test_check_equation(expr, numbers, target, ok):
    assert check_equation(expr, numbers, target) is ok


def test_extract_answer_takes_the_last_block():
    assert extract_answer("<answer>1+2</answer> then <answer> 3*4 </answer>") == "3*4"
    assert extract_answer("<think>no answer</think>") is None
    assert extract_answer("<answer>unclosed") is None


def test_countdown_reward_trl_signature():
    completions = [
        "<think>25*4=100, minus 3</think><answer>25*4-3</answer>",
        "<think>hmm</think><answer>25*4</answer>",
        "25*4-3",  # no answer tag
        [{"role": "assistant", "content": "<answer>(25-4)*3</answer>"}],  # conversational form
    ]
    r = countdown_reward(["p"] * 4, completions, numbers=[[3, 4, 25]] * 3 + [[25, 4, 3]], target=[97, 97, 97, 63],
                         **TRL_KW)
    assert r == [1.0, 0.0, 0.0, 1.0]


def test_countdown_reward_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="'numbers'"):
        countdown_reward(["p"], ["<answer>1</answer>"], numbers=[], target=[1])


# ---- format --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, strict, lenient", [
    ("<think>2+2 is 4</think><answer>4</answer>", True, True),
    ("  <think>\nreason\n</think>\n<answer>\n4\n</answer>\n", True, True),
    ("Sure! <think>r</think><answer>4</answer>", False, True),  # text before
    ("<think>r</think><answer>4</answer> bye", False, True),  # text after
    ("<think>r</think><answer> </answer>", False, False),  # empty answer
    ("<answer>4</answer><think>r</think>", False, False),  # wrong order
    ("<think>r</think>", False, False),
    ("<think>a</think><think>b</think><answer>4</answer>", False, True),  # repeated think
    ("<think>a<answer>3</answer></think><answer>4</answer>", False, True),  # nested tag
    ("<think>r</think><answer>4</answer><answer>5</answer>", False, True),
])
def test_format_rewards(text, strict, lenient):
    assert format_reward(None, [text], **TRL_KW) == [float(strict)]
    assert lenient_format_reward(None, [text], **TRL_KW) == [float(lenient)]


# ---- math ----------------------------------------------------------------------------------------------------


def test_last_boxed_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{\sqrt{2}}} end") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{unclosed {") is None
    assert last_boxed("nothing") is None


def test_extract_final_answer_precedence():
    assert extract_final_answer(r"\boxed{1} <answer>2</answer>") == "2"
    assert extract_final_answer(r"<answer>so \boxed{3}</answer>") == "3"
    assert extract_final_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 1,018") == "1018"
    assert extract_final_answer("The answer is 5.") is None


def test_math_reward_hand_checked():
    completions = [
        r"so the result is \boxed{\frac{1}{2}}",  # 1/2 == 0.5
        "<think>...</think><answer>0.5</answer>",
        "Step 1 ... #### 1,234",
        "The answer is 5.",  # no extractable answer -> 0
        r"<answer>x^2 + 2x + 1</answer>",  # symbolic equality
        r"\boxed{3}",  # wrong
        r"\boxed{3}",  # gold is a full GSM8K solution
        r"\boxed{4}",  # unparseable gold -> None
    ]
    gold = ["0.5", r"\frac{1}{2}", "1234", "5", "(x+1)^2", "4", "Janet has 1 + 2 = 3.\n#### 3", "???"]
    assert math_reward(["q"] * 8, completions, answer=gold, **TRL_KW) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, None]


def test_math_reward_solution_column_and_missing_gold():
    assert math_reward(None, [r"\boxed{7}"], solution=[r"We get \boxed{7}."]) == [1.0]
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        math_reward(None, ["x"])


# ---- code ----------------------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_fenced_block():
    text = "First:\n```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```\n"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("z = 4") == "z = 4"


def test_code_reward_asserts_and_io_pairs(bwrap):
    add = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b"
    asserts = ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
    io_prog = "a, b = map(int, input().split())\nprint(a + b)"
    io_tests = [{"input": "3 4\n", "output": "7\n"}, ("1 1", "2"), ("5 5", "11")]
    r = code_reward(["p"] * 4, [add, wrong, io_prog, ""], tests=[asserts, asserts, io_tests, asserts], **TRL_KW)
    assert r == [1.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0]  # a - b passes only add(0, 0)


@pytest.mark.parametrize("hack", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit",
                                  "print('pass 0')\nprint('pass 1')"])
def test_code_reward_early_exit_is_not_a_pass(hack, bwrap):
    assert code_reward(None, [hack], tests=[["assert False", "assert 1 == 2"]]) == [0.0]


def test_code_reward_timeout_counts_as_failure(bwrap):
    t = time.perf_counter()
    r = code_reward(None, ["def f():\n    while True: pass"], tests=[["assert f() is None"]], timeout_s=1.0)
    assert r == [0.0] and time.perf_counter() - t < 4


def test_code_reward_bad_test_case_is_a_clear_error():
    with pytest.raises(ValueError, match="input/output pair"):
        code_reward(None, ["print(1)"], tests=[[{"stdin": "1"}]])
    assert code_reward(None, ["print(1)"], tests=[[]]) == [None]


def test_code_reward_refuses_without_bubblewrap(monkeypatch):
    """No weaker fallback: resolving the reward (the start of a GRPO run) and running code both refuse, naming the
    install command."""
    monkeypatch.setenv("PATH", "/nonexistent")
    require_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            get_reward_fn("code")
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            code_reward(None, ["print(1)"], tests=[[("", "1")]])
    finally:
        require_bwrap.cache_clear()


# ---- containment, registry, task adapter ---------------------------------------------------------------------


def _raises(prompts, completions, **kw):
    raise RuntimeError("kaboom")


def _wrong_length(prompts, completions, **kw):
    return [1.0]


def _length(prompts, completions, **kw):
    return [len(c) / 10 for c in completions]


def test_compute_rewards_weights_and_metrics():
    completions = ["<think>a</think><answer>3+4</answer>", "<answer>3*4</answer>"]
    cols = {"numbers": [[3, 4], [3, 4]], "target": [7, 12]}
    res = compute_rewards([get_reward_fn("countdown"), get_reward_fn("format")], [1.0, 0.5], ["p", "p"],
                          completions, cols)
    assert res.per_fn == {"countdown_reward": [1.0, 1.0], "format_reward": [1.0, 0.0]}
    assert res.total == [1.5, 1.0]
    m = res.metrics()
    assert m["reward"] == 1.25 and m["rewards/countdown_reward/mean"] == 1.0 and m["rewards/format_reward/mean"] == 0.5


def _picky(prompts, completions, **kw):
    """Raises on the prompt "bad" only: a batch with it fails, each other row alone does not."""
    if "bad" in prompts:
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def _nan_second(prompts, completions, **kw):
    return [float("nan") if c == "b" else 1.0 for c in completions]


@pytest.mark.parametrize("fn, row, why", [
    (_raises, 0, "RuntimeError: kaboom"),
    (_picky, 1, "ValueError: cannot score 'bad'"),
    (_wrong_length, 0, "returned 1 values for 3 completions"),
    (_nan_second, 1, "gave nan, not a finite number"),
    (lambda p, c, **kw: [1.0, "x", 2.0], 1, "gave 'x', not a finite number"),
])
@pytest.mark.parametrize("timeout", [None, 10.0])  # in process, and in the forked worker
def test_failing_reward_stops_naming_the_function_and_the_row(fn, row, why, timeout):
    prompts = ["good", "bad", "fine"]
    with pytest.raises(RewardError) as err:
        compute_rewards([_length, fn], None, prompts, ["a", "b", "c"], {}, timeout_s=timeout)
    name = fn.__name__
    assert str(err.value).startswith(f"reward function {name} failed on completion {row} of 3 "
                                     f"(prompt {prompts[row]!r}): {why}; fix it, or pass --reward-errors skip")


def test_skipped_failures_are_none_counted_and_left_out_of_the_means(caplog):
    fns = [SkipFailures(f) for f in (_length, _picky, _nan_second, _raises, _wrong_length)]
    with caplog.at_level(logging.WARNING):
        res = compute_rewards(fns, [1.0, 1.0, 2.0, 1.0, 1.0], ["good", "bad", "fine"], ["a", "b", "cc"], {},
                              timeout_s=None)
    assert res.per_fn["_picky"] == [1.0, None, 1.0] and res.per_fn["_nan_second"] == [1.0, None, 1.0]
    assert res.per_fn["_raises"] == res.per_fn["_wrong_length"] == [None] * 3
    assert res.total == pytest.approx([0.1 + 1 + 2, 0.1, 0.2 + 1 + 2])
    assert [f.failed for f in fns] == [0, 1, 1, 3, 3] and {f.asked for f in fns} == {3}
    m = res.metrics()
    assert m["rewards/_picky/mean"] == 1.0 and math.isnan(m["rewards/_raises/mean"])
    assert "reward function _picky failed on completion 1 of 3 (prompt 'bad'): ValueError" in caplog.text
    with pytest.raises(RewardError, match="no reward could be computed"):
        check_computed(fns[3:])
    check_computed(fns[1:])  # _picky and _nan_second gave values


def test_hanging_reward_is_stopped_after_the_timeout(tmp_path):
    calls = tmp_path / "calls"

    def _hangs(prompts, completions, **kw):
        with open(calls, "a") as f:
            f.write(f"{len(completions)}\n")
        while True:
            pass

    with pytest.raises(RewardError, match=r"_hangs failed on completion 0 of 1 \(prompt 'p'\): no result within "
                                          r"0.5 s \(--reward-timeout-s\)"):
        compute_rewards([_length, _hangs], None, ["p"], ["abcde"], {}, timeout_s=0.5)
    skipped = SkipFailures(_hangs)
    res = compute_rewards([_length, skipped], [2.0, 1.0], ["p", "q"], ["abcde", "x"], {}, timeout_s=0.5)
    assert res.per_fn["_hangs"] == [None, None] and res.total == [1.0, 0.2] and skipped.failed == 2
    assert calls.read_text().split() == ["1", "2"]  # one call each: a hang is not retried row by row


def test_compute_rewards_none_values_count_as_zero():
    res = compute_rewards([get_reward_fn("math")], [2.0], ["q", "q"], [r"\boxed{4}", r"\boxed{4}"],
                          {"answer": ["4", "???"]})
    assert res.per_fn["math_reward"] == [1.0, None] and res.total == [2.0, 0.0]
    assert res.metrics()["rewards/math_reward/mean"] == 1.0


def test_compute_rewards_weight_mismatch():
    with pytest.raises(ValueError, match="weights"):
        compute_rewards([_length], [1.0, 2.0], ["p"], ["c"], {})


def test_registry():
    assert set(REWARD_FNS) >= {"math", "format", "countdown", "code"}
    assert get_reward_fn("countdown") is countdown_reward
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        get_reward_fn("nope")


def test_task_reward_with_example_and_answer_columns():
    task = get_task("arithmetic")
    exs = examples(task, 4, "train", seed=1)
    fn = task_reward(task)
    right = [ex.completion for ex in exs]
    wrong = [str(int(ex.answer) + 1) for ex in exs]
    assert fn([ex.prompt for ex in exs], right, example=exs, **TRL_KW) == [1.0] * 4
    assert fn([ex.prompt for ex in exs], wrong, example=exs) == [0.0] * 4
    assert fn([ex.prompt for ex in exs], right, answer=[ex.answer for ex in exs]) == [1.0] * 4
    assert fn.__name__ == "arithmetic_reward"
    with pytest.raises(ValueError, match="'example' or 'answer'"):
        fn(["p"], ["c"])


def test_math_reward_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # math-verify's signal-based timeout would raise here
        assert pool.submit(math_reward, None, [r"\boxed{1/2}", "#### 3"], answer=["0.5", "4"]).result() == [1.0, 0.0]


# ---- reward functions by import path, dataset columns, required columns ------------------------------------------

REWARD_MODULE = '''
def echo(prompts, completions, completion_ids, answer, level, **kwargs):
    """level*10 + number of completion tokens if the row's answer is in its completion, else -1."""
    out = []
    for p, c, ids, a, lv in zip(prompts, completions, completion_ids, answer, level):
        text = c if isinstance(p, str) else c[0]["content"]  # conversational: [{"role": "assistant", ...}]
        assert isinstance(p, str) == isinstance(c, str)
        out.append(lv * 10 + len(ids) if a in text else -1.0)
    return out

NOT_A_FUNCTION = 3
'''


def test_reward_by_import_path_gets_row_aligned_columns(tmp_path, monkeypatch):
    import json

    from nanoseek.datasets import columns_of, load_prompts
    from nanoseek.rewards import check_reward_columns, trl_completions

    (tmp_path / "myrewards").mkdir()
    (tmp_path / "myrewards" / "__init__.py").write_text("")
    (tmp_path / "myrewards" / "acc.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": "a?", "answer": "x", "level": 1},
            {"prompt": [{"role": "user", "content": "b?"}], "answer": "y", "level": 2},
            {"prompt": "c?", "answer": "z", "level": 3}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_prompts(tmp_path / "d.jsonl")
    batch = ds.batch(0, 3, seed=2)  # shuffled: alignment is what is tested
    assert [r.answer for r in batch] != ["x", "y", "z"]
    texts = {"x": "it is x", "y": "it is y", "z": "no idea"}
    prompts = [r.prompt for r in batch]
    completions = trl_completions(prompts, [texts[r.answer] for r in batch])
    ids = [[7] * len(texts[r.answer]) for r in batch]
    expected = [{"x": 17.0, "y": 27.0, "z": -1.0}[r.answer] for r in batch]
    for name in ("myrewards.acc:echo", "myrewards.acc.echo", f"{tmp_path}/myrewards/acc.py:echo"):
        fn = get_reward_fn(name)
        check_reward_columns([fn], ds.columns)
        for timeout in (None, 10.0):  # in process, and in the forked worker
            res = compute_rewards([fn], None, prompts, completions, columns_of(batch, ds.columns), timeout_s=timeout,
                                  completion_ids=ids)
            assert res.per_fn["echo"] == expected


def test_reward_module_in_the_current_directory(tmp_path, monkeypatch):
    """`nanoseek grpo --reward-funcs my_rewards:fn` run where my_rewards.py is, as `python -m` would find it."""
    (tmp_path / "cwd_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert get_reward_fn("cwd_rewards:echo").__module__ == "cwd_rewards"


@pytest.mark.parametrize("name, match", [
    ("nope", "unknown reward function 'nope'; built-in: .*math.*; or give an import path"),
    ("no_such_pkg.mod:fn", r"no module 'no_such_pkg.mod' on PYTHONPATH or in the current directory"),
    ("rw_mod:missing", r"module 'rw_mod' \(.*rw_mod.py\) has no attribute 'missing'; its functions: echo"),
    ("rw_mod:NOT_A_FUNCTION", r"rw_mod.NOT_A_FUNCTION is a int, not callable"),
    ("rw_broken.fn", r"importing 'rw_broken' failed: No module named 'not_installed_dep'"),
    ("rw_raises:fn", r"importing 'rw_raises' raised ZeroDivisionError"),
    ("missing_file.py:fn", r"no file missing_file.py"),
])
def test_reward_import_errors(tmp_path, monkeypatch, name, match):
    (tmp_path / "rw_mod.py").write_text(REWARD_MODULE)
    (tmp_path / "rw_broken.py").write_text("import not_installed_dep\n")
    (tmp_path / "rw_raises.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        get_reward_fn(name)


def test_check_reward_columns_names_function_and_dataset():
    from nanoseek.rewards import check_reward_columns, required_columns

    def needs_tests(prompts, completions, tests, completion_ids, timeout=3, **kw):
        return [0.0] * len(completions)

    assert required_columns(math_reward) == (("answer", "solution"),)
    assert required_columns(needs_tests) == (("tests",),)
    assert required_columns(get_reward_fn("countdown")) == (("numbers",), ("target",))
    assert required_columns(format_reward) == ()
    task_columns = {"answer", "example"}  # what a built-in task gives
    check_reward_columns([task_reward(get_task("arithmetic")), math_reward, format_reward], task_columns)
    check_reward_columns([math_reward], {"solution"})
    with pytest.raises(ValueError, match=r"reward function code_reward needs the column 'tests', which task "
                                         r"arithmetic lacks \(its columns: answer, example\)"):
        check_reward_columns([math_reward, code_reward], task_columns, "task arithmetic")
    with pytest.raises(ValueError, match=r"math_reward needs the column 'answer' or 'solution', which data.jsonl "
                                         r"lacks \(its columns: level\)"):
        check_reward_columns([math_reward], {"level"}, "data.jsonl")
    with pytest.raises(ValueError, match="needs_tests needs the column 'tests'"):
        check_reward_columns([needs_tests], {"answer"})


def test_math_reward_on_gsm8k_answers():
    gold = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "#### 1,000"]
    completions = [[{"role": "assistant", "content": r"48 + 24 = 72, so \boxed{72}"}], "So 1000.\n#### 1000"]
    assert math_reward([[{"role": "user", "content": "q"}], "q"], completions, answer=gold) == [1.0, 1.0]
    assert math_reward(["q", "q"], ["#### 71", r"\boxed{100}"], answer=gold) == [0.0, 0.0]


@pytest.mark.parametrize("text, ok", [
    ("5+3=8\n8-2=6\n#### 6", True), ("work\n#### 1,000\n", True), ("x\n####-3", True),
    ("#### 6", False),  # no work
    ("5+3=8\n#### 6\nmore", False), ("5+3=8\n#### six", False), ("5+3=8\n\n#### 6 7", False),
    ("a # b\n#### 6", False), ("5+3=8 #### 8", False),
])
def test_gsm8k_format_reward(text, ok):
    assert get_reward_fn("format_gsm8k")(None, [text, [{"role": "assistant", "content": text}]]) == [float(ok)] * 2


@pytest.mark.parametrize("text, ok", [
    ("5+3=8\n8-2=6\n#### 6", True), ("7*5=35\n35-26=9\n#### 9", True), ("12/3=4\n#### 4", True),
    (" 3 - 5 = -2", True),
    ("7*5=32\n4+19=37\n#### 32", False),  # the right answer after wrong work (seen from a tiny model)
    ("#### 6", False),  # no work
    ("5+3=8\n8-2=7", False), ("5/0=0", False), ("7/2=3", False), ("5+3+1=9", False), ("x=5", False),
])
def test_equations_reward(text, ok):
    assert get_reward_fn("equations")(None, [text, [{"role": "assistant", "content": text}]]) == [float(ok)] * 2


def test_rewards_import_no_task():
    """Tasks score with the rewards' verifiers, so the rewards package imports no task (nor dataset) module, not
    even inside a function: no import cycle between ``nanoseek.rewards`` and ``nanoseek.tasks``."""
    import ast
    from pathlib import Path

    import nanoseek.rewards

    for path in Path(nanoseek.rewards.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("nanoseek.tasks", "nanoseek.datasets", "nanoseek.data")), (path, name)
