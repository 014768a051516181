"""Verifiable reward functions with TRL's signature
``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``, a registry, and
``compute_rewards``, which contains failing or hanging functions; process rewards (per-step,
``nanoseek.rewards.process``) and ``compute_process_rewards``, which contains them the same way.

As in TRL: ``prompts[i]`` is the dataset's prompt (a string, or a list of ``{"role", "content"}`` messages),
``completions[i]`` the sampled text, or ``[{"role": "assistant", "content": text}]`` when the prompt is
conversational (``trl_completions``), ``completion_ids[i]`` its token ids, and every other dataset column arrives as
a keyword list aligned with the completions (row i of each column belongs to completion i). None means "no reward
for this sample"; it counts as 0 in the total and is left out of the function's mean.

``get_reward_fn`` takes a built-in name or an import path (a built-in task's reward is
``nanoseek.tasks.task_reward``); ``check_reward_columns`` refuses, before training, a
reward function that needs a column the dataset lacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import isnan, nan  # (the name `math` is the submodule nanoseek.rewards.math here)
from pathlib import Path

from nanoseek.rewards.code import code_reward
from nanoseek.rewards.countdown import countdown_reward
from nanoseek.rewards.format import format_reward, gsm8k_format_reward, lenient_format_reward
from nanoseek.rewards.math import equations_reward, math_reward
from nanoseek.rewards.process import PROCESS_REWARD_FNS, StepRewards, check_steps, get_process_reward_fn
from nanoseek.rewards.sandbox import require_bwrap

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]

REWARD_FNS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "format_lenient": lenient_format_reward,
    "format_gsm8k": gsm8k_format_reward,
    "equations": equations_reward,
    "countdown": countdown_reward,
    "code": code_reward,
}
# built-ins: fast, or (code) bounded by their own sandbox timeout
_IN_PROCESS = frozenset(REWARD_FNS.values()) | frozenset(PROCESS_REWARD_FNS.values())


def get_reward_fn(name: str) -> RewardFn:
    """A reward function by name: a built-in (``REWARD_FNS``), or an import path, ``package.module:function``,
    ``package.module.function`` or ``path/to/file.py:function``. Modules are imported from ``sys.path`` (which
    includes PYTHONPATH) and the current directory, as ``python -m`` would."""
    if name == "code":
        require_bwrap()  # refuse now, at the start of a run: compute_rewards would turn each step's error into None
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if ":" not in name and "." not in name:
        raise ValueError(f"unknown reward function {name!r}; built-in: {', '.join(sorted(REWARD_FNS))}; or give "
                         "an import path, package.module:function")
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    module = _import(module_name, name)
    if not hasattr(module, attr):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward function {name!r}: module {module_name!r} ({module.__file__}) has no attribute "
                         f"{attr!r}; its functions: {', '.join(public) or 'none'}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: {module_name}.{attr} is a {type(fn).__name__}, not callable")
    return fn


def _import(module_name: str, spec: str):
    """The module of a reward import path; errors say which module is missing and where it was looked for."""
    path = Path(module_name)
    if module_name.endswith(".py") and not path.is_file():
        raise ValueError(f"reward function {spec!r}: no file {path}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        loader = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[path.stem] = module  # so that pickling and the forked reward workers find it
        loader.loader.exec_module(module)
        return module
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"reward function {spec!r}: no module {module_name!r} on PYTHONPATH or in the current "
                             f"directory {os.getcwd()}") from None
        raise ValueError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ValueError(f"reward function {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e


def required_columns(fn: RewardFn) -> tuple[tuple[str, ...], ...]:
    """The dataset columns ``fn`` needs, as groups of which one column must be present: its ``required_columns``
    attribute if it sets one (``math_reward``: ``(("answer", "solution"),)``), else the keyword parameters of its
    signature without a default after ``prompts, completions`` (``def f(prompts, completions, tests, **kw)``
    needs ``tests``); ``completion_ids`` is always given."""
    declared = getattr(fn, "required_columns", None)
    if declared is not None:
        return tuple((g,) if isinstance(g, str) else tuple(g) for g in declared)
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple((p.name,) for p in params
                 if p.kind in kinds and p.default is p.empty and p.name != "completion_ids")


def check_reward_columns(fns: Sequence[RewardFn], columns, dataset: str = "the dataset") -> None:
    """Raise ValueError, naming the function and the dataset, if a reward function needs a column (see
    ``required_columns``) that ``columns`` (the dataset's column names) lacks. Call it once before training."""
    have = set(columns)
    for fn in fns:
        for group in required_columns(fn):
            if not have & set(group):
                raise ValueError(
                    f"reward function {reward_name(fn)} needs the column {' or '.join(map(repr, group))}, which "
                    f"{dataset} lacks (its columns: {', '.join(sorted(have)) or 'none besides the prompt'}); "
                    "rename one with --answer-column, add it to the data, or choose another reward function")


def trl_completions(prompts: list, texts: list[str]) -> list:
    """Completions as TRL passes them to reward functions: the text for a string prompt, a one-message
    conversation ``[{"role": "assistant", "content": text}]`` for a conversational prompt."""
    return [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class RewardResult:
    total: list[float]  # (N,) weighted sum over functions; None counts as 0
    per_fn: dict[str, list[float | None]]  # name -> (N,) raw values, None where unavailable
    errors: dict[str, str] = field(default_factory=dict)  # name -> why it gave None (raised, hung, bad output)

    def metrics(self) -> dict[str, float]:
        """TRL's names: ``reward`` (mean total) and ``rewards/<fn>/mean`` over the samples that have a value."""
        out = {"reward": sum(self.total) / max(len(self.total), 1)}
        for name, values in self.per_fn.items():
            have = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = sum(have) / len(have) if have else nan
        return out


def _child(conn, fn, prompts, completions, columns) -> None:
    try:
        conn.send(("ok", fn(prompts, completions, **columns)))
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _call_with_timeout(fn, prompts, completions, columns, timeout_s: float):
    """Run ``fn`` in a forked process; abandon (kill) it after ``timeout_s``. Raises TimeoutError / RuntimeError."""
    ctx = multiprocessing.get_context("fork")  # fork: closures and lambdas work, no re-import
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, prompts, completions, columns), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise TimeoutError(f"no result within {timeout_s} s")
        status, value = recv.recv()
    except EOFError:
        raise RuntimeError(f"worker died (exit code {proc.exitcode})") from None
    finally:
        proc.kill()
        proc.join()
        recv.close()
    if status == "error":
        raise RuntimeError(value)
    return value


def _call(fn: Callable[..., list], prompts: list, completions: list, columns: dict, timeout_s: float | None) -> list:
    """fn's values as a list of one per completion: in process for built-ins, else in a killable worker."""
    if timeout_s is None or fn in _IN_PROCESS:
        values = list(fn(prompts, completions, **columns))
    else:
        values = list(_call_with_timeout(fn, prompts, completions, columns, timeout_s))
    if len(values) != len(completions):
        raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
    return values


def compute_rewards(
    reward_fns: Sequence[RewardFn],
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    columns: dict | None = None,
    timeout_s: float | None = 60.0,
    completion_ids: list[list[int]] | None = None,
) -> RewardResult:
    """Weighted rewards of N completions, surviving bad reward functions.

    A function that raises, returns the wrong number of values, or (with ``timeout_s``) runs longer than
    ``timeout_s`` gives None for all its samples and is logged with ``logging.warning``; the others still count.
    Built-in functions run in-process; others run in a forked worker when ``timeout_s`` is set (a thread cannot
    be stopped), so a hang is cut off. ``columns`` are the dataset columns passed as keyword arguments, with
    ``completion_ids`` (the sampled token ids, TRL's argument) when given.
    """
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"compute_rewards: {len(reward_fns)} reward functions but {len(weights)} weights")
    columns = {**(columns or {}), **({} if completion_ids is None else {"completion_ids": completion_ids})}
    n = len(completions)
    total = [0.0] * n
    per_fn: dict[str, list[float | None]] = {}
    errors: dict[str, str] = {}
    for fn, w in zip(reward_fns, weights):
        name = reward_name(fn)
        try:
            values = [None if v is None else float(v) for v in _call(fn, prompts, completions, columns, timeout_s)]
        except Exception as e:  # noqa: BLE001 - a broken reward function must not stop training
            log.warning("reward function %s failed: %s: %s", name, type(e).__name__, e)
            errors[name] = f"{type(e).__name__}: {e}"
            values = [None] * n
        per_fn[name] = values
        for i, v in enumerate(values):
            if v is not None and not isnan(v):
                total[i] += w * v
    return RewardResult(total, per_fn, errors)


def compute_process_rewards(
    fn: Callable[..., list],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict | None = None,
    timeout_s: float | None = 60.0,
) -> tuple[list[StepRewards | None], list[str]]:
    """Step rewards of N completions from one process reward function, contained like ``compute_rewards``:
    -> (steps (N,), errors). A function that raises, hangs past ``timeout_s`` or returns the wrong number of values
    gives None (no steps) for every sample; an invalid value (see ``check_steps``) gives None for that sample.
    Each failure is logged with ``logging.warning`` and listed in ``errors``."""
    name, n = reward_name(fn), len(completions)
    columns = {**(columns or {}), "completion_ids": completion_ids}
    try:
        values = _call(fn, prompts, completions, columns, timeout_s)
    except Exception as e:  # noqa: BLE001 - a broken reward function must not stop training
        log.warning("process reward %s failed: %s: %s", name, type(e).__name__, e)
        return [None] * n, [f"{name}: {type(e).__name__}: {e}"]
    steps: list[StepRewards | None] = []
    errors: list[str] = []
    for i, (v, ids) in enumerate(zip(values, completion_ids)):
        try:
            steps.append(check_steps(v, len(ids), i, name))
        except ValueError as e:
            log.warning("%s", e)
            errors.append(str(e))
            steps.append(None)
    return steps, errors


__all__ = ["PROCESS_REWARD_FNS", "REWARD_FNS", "RewardResult", "StepRewards", "check_reward_columns",
           "compute_process_rewards", "compute_rewards", "get_process_reward_fn", "get_reward_fn", "required_columns",
           "reward_name", "trl_completions"]
