"""Verifiable reward functions with TRL's signature ``fn(prompts, completions, completion_ids, **columns) ->
list[float | None]`` (each dataset column a keyword list aligned with the completions; None: no reward for that
sample, 0 in the total, left out of the mean), a registry, and ``compute_rewards`` / ``compute_process_rewards``,
which contain failing or hanging functions."""

from __future__ import annotations

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


@dataclass
class RewardResult:
    total: list[float]  # (N,) weighted sum over functions; None counts as 0
    per_fn: dict[str, list[float | None]]  # name -> (N,) raw values, None where unavailable
    errors: dict[str, str] = field(default_factory=dict)  # name -> why it gave None (raised, hung, bad output)

    def metrics(self) -> dict[str, float]:
        """TRL's names: ``reward`` (mean total) and ``rewards/<fn>/mean`` over the samples that have a value."""
        have = {name: [v for v in values if v is not None] for name, values in self.per_fn.items()}
        return {"reward": sum(self.total) / max(len(self.total), 1),
                **{f"rewards/{name}/mean": sum(v) / len(v) if v else nan for name, v in have.items()}}


def _call_with_timeout(fn, prompts, completions, columns, timeout_s: float):
    """Run ``fn`` in a forked process (closures work, nothing is re-imported); kill it after ``timeout_s``."""
    def child(conn) -> None:
        try:
            conn.send(("ok", fn(prompts, completions, **columns)))
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,), daemon=True)
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


def _call(fn, prompts: list, completions: list, columns: dict, timeout_s: float | None, kind: str, cast=None):
    """(fn's values through ``cast``, None), or (None, why) logged as a warning if it raised, hung past
    ``timeout_s`` or returned the wrong number. Built-ins run in process, others in a killable forked worker."""
    try:
        in_process = timeout_s is None or fn in _IN_PROCESS
        values = list(fn(prompts, completions, **columns) if in_process
                      else _call_with_timeout(fn, prompts, completions, columns, timeout_s))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        return [v if cast is None or v is None else cast(v) for v in values], None
    except Exception as e:  # noqa: BLE001 - a broken reward function must not stop training
        log.warning("%s %s failed: %s: %s", kind, reward_name(fn), type(e).__name__, e)
        return None, f"{type(e).__name__}: {e}"


def compute_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts: list,
                    completions: list, columns: dict | None = None, timeout_s: float | None = 60.0,
                    completion_ids: list[list[int]] | None = None) -> RewardResult:
    """Weighted rewards of N completions; a function that fails (``_call``) gives None for all its samples."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"compute_rewards: {len(reward_fns)} reward functions but {len(weights)} weights")
    columns = {**(columns or {}), **({} if completion_ids is None else {"completion_ids": completion_ids})}
    total, per_fn, errors = [0.0] * len(completions), {}, {}
    for fn, w in zip(reward_fns, weights):
        values, error = _call(fn, prompts, completions, columns, timeout_s, "reward function", float)
        if values is None:
            values, errors[reward_name(fn)] = [None] * len(completions), error
        per_fn[reward_name(fn)] = values
        total = [t + w * v if v is not None and not isnan(v) else t for t, v in zip(total, values)]
    return RewardResult(total, per_fn, errors)


def compute_process_rewards(fn: Callable[..., list], prompts: list, completions: list,
                            completion_ids: list[list[int]], columns: dict | None = None,
                            timeout_s: float | None = 60.0) -> tuple[list[StepRewards | None], list[str]]:
    """-> (steps (N,), errors): step rewards of one process reward function, contained like ``compute_rewards``;
    an invalid value (``check_steps``) gives None for its sample, logged and listed in ``errors``."""
    name = reward_name(fn)
    values, error = _call(fn, prompts, completions, {**(columns or {}), "completion_ids": completion_ids},
                          timeout_s, "process reward")
    if values is None:
        return [None] * len(completions), [f"{name}: {error}"]
    steps, errors = [], []
    for i, (v, ids) in enumerate(zip(values, completion_ids)):
        try:
            steps.append(check_steps(v, len(ids), i, name))
        except ValueError as e:
            log.warning("%s", e)
            errors.append(str(e))
            steps.append(None)
    return steps, errors
