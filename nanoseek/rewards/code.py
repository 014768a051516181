"""Code reward: the fraction of a sample's ``tests`` the completion's program passes in the sandbox
(``nanoseek.rewards.sandbox``; 0.0 for no code, None for no tests). A test is either
- an assert statement, ``"assert add(2, 3) == 5"``: the program runs once, then each assert in its own try/except;
  the pass marker carries a random nonce and is printed after the tests ran, so an early ``sys.exit(0)`` scores 0;
- an input/output pair, ``{"input": "3 4\\n", "output": "7"}`` (or a 2-tuple): the program runs with that stdin
  and passes if it exits 0 printing the output (up to trailing whitespace per line)."""

from __future__ import annotations

import re
import secrets

from nanoseek.rewards.format import completion_text
from nanoseek.rewards.sandbox import run_code

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

_HARNESS = """\
_nonce, _tests, _program = {nonce!r}, {tests!r}, {program!r}
_write, _fd = __import__("os").write, __import__("os").dup(1)
_ns = {{"__name__": "__main__"}}
try:
    exec(compile(_program, "<completion>", "exec"), _ns)
except BaseException:
    _tests = []
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, "<test>", "exec"), _ns)
        _write(_fd, f"\\n{{_nonce}} pass {{_i}}\\n".encode())
    except BaseException:
        pass
"""


def extract_code(completion: str) -> str:
    """The last fenced ```python (or bare ```) block of a completion, else the whole text."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def run_tests(program: str, tests: list, timeout_s: float = 5.0) -> float:
    """Fraction of ``tests`` (asserts or input/output pairs, see the module docstring) that ``program`` passes."""
    if not tests:
        raise ValueError("run_tests: no test cases")
    if all(isinstance(t, str) for t in tests):
        nonce = secrets.token_hex(16)
        result = run_code(_HARNESS.format(nonce=nonce, tests=list(tests), program=program), timeout_s=timeout_s)
        passed = {line.split()[2] for line in result.stdout.splitlines() if line.startswith(nonce + " pass ")}
        return len(passed) / len(tests)
    passed = 0
    for case in tests:
        if isinstance(case, dict) and "input" in case and "output" in case:
            stdin, expected = case["input"], case["output"]
        elif isinstance(case, (tuple, list)) and len(case) == 2:
            stdin, expected = case
        else:
            raise ValueError(f"test case {case!r} is neither an assert string nor an input/output pair "
                             "({'input': ..., 'output': ...} or (input, output))")
        result = run_code(program, stdin=str(stdin), timeout_s=timeout_s)
        passed += result.passed and _normalize(result.stdout) == _normalize(str(expected))
    return passed / len(tests)


def code_reward(prompts, completions, tests, timeout_s: float = 5.0, **kwargs) -> list[float | None]:
    """Fraction of the sample's ``tests`` passed by the completion's code."""
    programs = [extract_code(completion_text(c)) for c in completions]
    return [None if not cases else 0.0 if not p.strip() else run_tests(p, list(cases), timeout_s)
            for p, cases in zip(programs, tests)]
