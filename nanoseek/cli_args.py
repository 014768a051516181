"""Command-line flags generated from the config dataclasses: each default, help text and allowed range is written
once, in the field (``option``), and both ``--help`` and the start-up validation read it from there."""

from __future__ import annotations

import argparse
import json
import math
import operator
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any


def option(default: Any = MISSING, help: str = "", *, min: float | None = None, gt: float | None = None,
           max: float | None = None, choices: tuple | None = None, default_factory: Any = MISSING,
           cli: bool = True, **kwargs: Any) -> Any:
    """A dataclass field with its flag's help, its range (``min`` ≤ v, ``gt`` < v, v ≤ ``max``) and choices.
    ``cli=False`` keeps a field out of the command line (set by code only); other ``kwargs`` go to argparse."""
    meta = {"help": help, "min": min, "gt": gt, "max": max, "choices": choices, "cli": cli, "argparse": kwargs}
    return field(default=default, default_factory=default_factory, metadata=meta)


# Old flag names, refused with the one name each concept has now (TRL's where TRL has the concept).
RENAMED: dict[str, str] = {
    "--checkpoint": "--model", "--init-from": "--model", "--max-new-tokens": "--max-completion-length",
    "--max-len": "--max-model-len", "--num-samples": "--num-generations", "--k": "--num-generations",
    "--ckpt-every": "--save-every", "--warmup": "--warmup-steps", "--schedule": "--lr-schedule",
    "--grad-clip": "--max-grad-norm", "--eval-k": "--eval-num-generations",
}


def check_renamed(argv: list[str]) -> None:
    """ValueError for a flag that has a new name, naming the new one."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in RENAMED:
            raise ValueError(f"{old} is now {RENAMED[old]}")


def check_ranges(cfg: Any, label: Callable[[str, Any], str] | None = None) -> None:
    """ValueError for the first field outside its range or choices: ``label(name, value)`` (or flag), rule, help."""
    for f in fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m or v is None or isinstance(v, bool):
            continue
        rule = None
        if m.get("choices") is not None and v not in m["choices"]:
            rule = f"must be one of {', '.join(map(str, m['choices']))}"
        elif isinstance(v, float) and not math.isfinite(v):
            rule = "must be a finite number"
        elif isinstance(v, int | float):  # the first bound broken, in the order min, gt, max
            bounds = ((m.get("min"), ">=", operator.lt), (m.get("gt"), ">", operator.le),
                      (m.get("max"), "<=", operator.gt))
            rule = next((f"must be {op} {b}" for b, op, breaks in bounds if b is not None and breaks(v, b)), None)
        if rule:
            where = label(f.name, v) if label else f"--{f.name.replace('_', '-')} {v!r}"
            raise ValueError(f"{where}: {rule}" + (f" ({m['help']})" if m.get("help") else ""))


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"max_operand\": 9}'")
    return value


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, typed from its annotation (a subclass redeclares a field for another default)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        m = f.metadata or {}
        if not m.get("cli", True):
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else f.default if f.default is not MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": default, "dest": f.name, "required": required}
        args = typing.get_args(hints[f.name])
        base = next(a for a in args if a is not type(None)) if type(None) in args else hints[f.name]  # X | None: X
        origin, item = typing.get_origin(base), typing.get_args(base)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            kw.update(nargs="*" if origin is list else len(item), type=item[0])
        elif base is dict or origin is dict:
            kw.update(type=_json_object, metavar="JSON")
        else:  # int, float, str, and str-or-callable fields (given by name on the command line); choices: scalars only
            kw.update(type=base if base in (int, float) else str, choices=m.get("choices"))
        help_text = m.get("help", "") + ("" if required else " (default: %(default)s)")
        parser.add_argument("--" + f.name.replace("_", "-"), help=help_text, **{**kw, **m.get("argparse", {})})


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **overrides)


def run_command(train: Callable[[Any], dict], cfg: Any) -> int:
    """``train(cfg)`` from the CLI: rank 0 prints the summary; 130 after a Ctrl-C save; errors go to ``cli.main``."""
    from nanoseek.distributed import cleanup, is_main

    try:
        summary = train(cfg)
    except BaseException:
        cleanup(synchronize=False)
        raise
    if is_main():
        print(json.dumps(summary))
    cleanup()
    return 130 if summary["interrupted"] else 0


def subcommand(cls: type, train: Callable[[Any], dict]) -> tuple[Callable, Callable]:
    """A training command's ``(add_arguments, run)``: one flag per field of ``cls``; ``run_command(train, cfg)``."""
    return lambda parser: add_arguments(parser, cls), lambda args: run_command(train, from_args(cls, args))
