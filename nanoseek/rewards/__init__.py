"""Verifiable reward functions with TRL's signature ``fn(prompts, completions, completion_ids, **columns) ->
list[float | None]`` (each dataset column a keyword list aligned with the completions; None: no reward for that
sample, 0 in the total, left out of the mean), a registry, and ``compute_rewards`` / ``compute_process_rewards``,
which stop hanging functions; a failing one stops the run unless ``--reward-errors skip``."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from math import isfinite, nan  # (the name `math` is the submodule nanoseek.rewards.math here)
from pathlib import Path

from nanoseek.cli_args import option
from nanoseek.rewards.code import code_reward
from nanoseek.rewards.countdown import countdown_reward
from nanoseek.rewards.format import format_reward, gsm8k_format_reward, lenient_format_reward
from nanoseek.rewards.math import equations_reward, math_reward
from nanoseek.rewards.process import PROCESS_REWARD_FNS, StepRewards, check_steps
from nanoseek.rewards.sandbox import require_bwrap

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]

REWARD_FNS: dict[str, RewardFn] = {
    "math": math_reward, "format": format_reward, "format_lenient": lenient_format_reward, "code": code_reward,
    "format_gsm8k": gsm8k_format_reward, "equations": equations_reward, "countdown": countdown_reward}
_IN_PROCESS = frozenset(REWARD_FNS.values()) | frozenset(PROCESS_REWARD_FNS.values())


def get_reward_fn(name: str) -> RewardFn:
    """A built-in (``REWARD_FNS``), or an import path (``package.module:function``, ``package.module.function``,
    ``path/to/file.py:function``) from ``sys.path`` and the current directory."""
    if name == "code":
        require_bwrap()  # refuse at the start of a run, not with a None reward at every step
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if ":" not in name and "." not in name:
        raise ValueError(f"unknown reward function {name!r}; built-in: {', '.join(sorted(REWARD_FNS))}; or give "
                         "an import path, package.module:function")
    module_name, _, attr = name.rpartition(":" if ":" in name else ".")
    what, path = f"reward function {name!r}", Path(module_name)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    if module_name.endswith(".py") and not path.is_file():
        raise ValueError(f"{what}: no file {path}")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # for pickle and forked workers
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"{what}: no module {module_name!r} on PYTHONPATH or in the current directory "
                             f"{os.getcwd()}") from None
        raise ValueError(f"{what}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ValueError(f"{what}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{what}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}; its "
                         f"functions: {', '.join(public) or 'none'}")
    if not callable(fn):
        raise ValueError(f"{what}: {module_name}.{attr} is a {type(fn).__name__}, not callable")
    return fn


def required_columns(fn: RewardFn) -> tuple[tuple[str, ...], ...]:
    """The dataset columns ``fn`` needs, as groups of which one must be present: its ``required_columns``
    attribute, else its parameters without a default after ``prompts, completions`` (but ``completion_ids``)."""
    declared = getattr(fn, "required_columns", None)
    if declared is not None:
        return tuple((g,) if isinstance(g, str) else tuple(g) for g in declared)
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple((p.name,) for p in params if p.kind in kinds and p.default is p.empty and p.name != "completion_ids")


def check_reward_columns(fns: Sequence[RewardFn], columns, dataset: str = "the dataset") -> None:
    """ValueError if a reward function needs a column (``required_columns``) that ``columns`` lacks."""
    have = set(columns)
    for fn in fns:
        for group in required_columns(fn):
            if not have & set(group):
                raise ValueError(
                    f"reward function {reward_name(fn)} needs the column {' or '.join(map(repr, group))}, which "
                    f"{dataset} lacks (its columns: {', '.join(sorted(have)) or 'none besides the prompt'}); "
                    "rename one with --answer-column, add it to the data, or choose another reward function")


def trl_completions(prompts: list, texts: list[str]) -> list:
    """Completions as TRL passes them: the text, or an assistant message after a conversational prompt."""
    return [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class RewardError(RuntimeError):
    """A reward function raised, hung, or gave the wrong number of values, NaN or not a number."""


class SkipFailures:
    """``fn`` under ``--reward-errors skip``: a value it fails to give is None, counted in ``failed`` (of ``asked``)."""

    def __init__(self, fn: RewardFn):
        self.fn, self.__name__, self.required_columns = fn, reward_name(fn), required_columns(fn)
        self.failed = self.asked = 0


@dataclass(frozen=True, kw_only=True)
class RewardFlags:
    """How every command that scores runs the reward functions."""

    reward_timeout_s: float | None = option(60.0, "seconds before a reward function (not a built-in) is stopped", gt=0)
    reward_errors: str = option("raise", "a reward function that raises, hangs, gives the wrong number of values or "
                                "NaN: stop (raise) or leave such values out, counted (skip)", choices=("raise", "skip"))

    def guard(self, fns: Sequence[RewardFn]) -> list[RewardFn]:
        return [SkipFailures(fn) for fn in fns] if self.reward_errors == "skip" else list(fns)


def check_computed(fns: Sequence[RewardFn]) -> None:
    """RewardError if no reward could be computed: every value of every function failed (``SkipFailures``)."""
    if fns and all(isinstance(f, SkipFailures) and f.failed == f.asked > 0 for f in fns):
        raise RewardError("no reward could be computed: every value of every reward function failed (see above)")


@dataclass
class RewardResult:
    total: list[float]  # (N,) weighted sum over functions; None counts as 0
    per_fn: dict[str, list[float | None]]  # name -> (N,) values, None where unavailable (or failed, skipped)

    def metrics(self) -> dict[str, float]:
        """TRL's names: ``reward`` (mean total) and ``rewards/<fn>/mean`` over the samples that have a value."""
        have = {name: [v for v in values if v is not None] for name, values in self.per_fn.items()}
        return {"reward": sum(self.total) / max(len(self.total), 1),
                **{f"rewards/{name}/mean": sum(v) / len(v) if v else nan for name, v in have.items()}}


def _in_worker(fn, prompts, completions, columns, timeout_s: float) -> list:
    """``fn``'s values from a forked process (closures work, nothing is re-imported), killed after ``timeout_s``."""
    def child(conn) -> None:
        try:
            conn.send(("ok", list(fn(prompts, completions, **columns))))
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise TimeoutError(f"no result within {timeout_s} s (--reward-timeout-s)")
        status, value = recv.recv()
    except EOFError:
        raise RewardError(f"worker died (exit code {proc.exitcode})") from None
    finally:
        proc.kill()
        proc.join()
        recv.close()
    if status == "error":
        raise RewardError(value)
    return value


def _call(fn, prompts: list, completions: list, columns: dict, timeout_s: float | None) -> list | Exception:
    """``fn``'s values (built-ins in process, others in a worker stopped after ``timeout_s``; None: in process), or
    why there are none: a RewardError (it raised), TimeoutError (it hung) or ValueError (the wrong number)."""
    try:
        values = list(fn(prompts, completions, **columns) if timeout_s is None or fn in _IN_PROCESS
                      else _in_worker(fn, prompts, completions, columns, timeout_s))
    except Exception as e:  # noqa: BLE001 - reported with the function's name (and the row)
        return e if isinstance(e, RewardError | TimeoutError) else RewardError(f"{type(e).__name__}: {e}")
    n = len(completions)
    return values if len(values) == n else ValueError(f"returned {len(values)} values for {n} completions")


def _checked(fn, prompts: list, completions: list, columns: dict, timeout_s: float | None) -> list[float | None]:
    """``fn``'s N values (float or None); a failure (``_call``, NaN or not a number) is a RewardError naming ``fn``
    and the row, or under SkipFailures None, counted and logged. A call that raised is redone row by row."""
    skip, n = isinstance(fn, SkipFailures), len(completions)
    call = partial(_call, fn.fn if skip else fn, timeout_s=timeout_s)
    got = call(prompts, completions, columns)
    if isinstance(got, RewardError):  # which rows? each alone, lazily: a raise stops at the first
        alone = (call([prompts[i]], [completions[i]], {k: c[i : i + 1] for k, c in columns.items()}) for i in range(n))
        got = (r if isinstance(r, Exception) else r[0] for r in alone)
    got = [got] * n if isinstance(got, Exception) else got  # it hung or gave the wrong number: no one row to blame
    values, failed = [], []
    for i, v in enumerate(got):
        if not (v is None or isinstance(v, Exception)):
            v = float(v) if hasattr(v, "__float__") and isfinite(v) else ValueError(f"gave {v!r}, not a finite number")
        if isinstance(v, Exception):
            failed.append(f"reward function {reward_name(fn)} failed on completion {i} of {n} (prompt "
                          f"{str(prompts[i])[:60]!r}): {v}")
            if not skip:
                raise RewardError(f"{failed[0]}; fix it, or pass --reward-errors skip to leave such values out") from v
        values.append(None if isinstance(v, Exception) else v)
    if skip:
        fn.failed, fn.asked = fn.failed + len(failed), fn.asked + n
        if failed:
            log.warning("%d of %d values left out (--reward-errors skip); the first: %s", len(failed), n, failed[0])
    return values


def compute_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts: list,
                    completions: list, columns: dict | None = None, timeout_s: float | None = 60.0,
                    completion_ids: list[list[int]] | None = None) -> RewardResult:
    """Weighted rewards of N completions; a function that fails stops the run, unless skipped (``_checked``)."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"compute_rewards: {len(reward_fns)} reward functions but {len(weights)} weights")
    columns = {**(columns or {}), **({} if completion_ids is None else {"completion_ids": completion_ids})}
    total, per_fn = [0.0] * len(completions), {}
    for fn, w in zip(reward_fns, weights):
        per_fn[reward_name(fn)] = values = _checked(fn, prompts, completions, columns, timeout_s)
        total = [t + w * v if v is not None else t for t, v in zip(total, values)]
    return RewardResult(total, per_fn)


def compute_process_rewards(fn: Callable[..., list], prompts: list, completions: list,
                            completion_ids: list[list[int]], columns: dict | None = None,
                            timeout_s: float | None = 60.0) -> tuple[list[StepRewards | None], list[str]]:
    """-> (steps (N,), errors): step rewards of one process reward function; a failure (``_call``) or an invalid
    value (``check_steps``) gives None for its samples, logged and listed in ``errors``."""
    name = reward_name(fn)
    values = _call(fn, prompts, completions, {**(columns or {}), "completion_ids": completion_ids}, timeout_s)
    if isinstance(values, Exception):
        log.warning("process reward %s failed: %s", name, values)
        return [None] * len(completions), [f"{name}: {values}"]
    steps, errors = [], []
    for i, (v, ids) in enumerate(zip(values, completion_ids)):
        try:
            steps.append(check_steps(v, len(ids), i, name))
        except ValueError as e:
            log.warning("%s", e)
            errors.append(str(e))
            steps.append(None)
    return steps, errors
