"""What every recipe shares: stages recorded in OUT/stages.json (what ``--resume`` skips), the fixed held-out
set of a built-in task, evaluation of a checkpoint on it, SFT and GRPO stages, means and paired differences with
their confidence intervals, percent cells, markdown tables and the report files."""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.cli_args import check_ranges, from_args, option
from nanoseek.datasets import task_dataset
from nanoseek.distributed import device_of
from nanoseek.evaluate import evaluate
from nanoseek.policy import Policy
from nanoseek.rollout import Scorer
from nanoseek.rundir import check_run_dir
from nanoseek.tasks import get_task, task_reward
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.pretrain import SFTConfig, train


@dataclass
class RecipeArgs:
    """The flags of a recipe command."""

    quick: bool = option(False, "the shortened run (the tests')")
    seed: int = option(0, "seed of the model, the data order and the sampling")
    out: str = option("runs/recipe", "run directory (stages, checkpoints, metrics, report.md)")
    resume: bool = option(False, "skip finished stages, continue the interrupted one")
    overwrite: bool = option(False, "delete the earlier run in --out and start over")
    threads: int = option(1, "torch CPU threads (1: small matrices gain little from more; none oversubscribed)", min=1)
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")


def start(cls: type, args: argparse.Namespace, kind: str):
    """The recipe's flags (checked), its run directory, and torch set up: -> (flags, OUT)."""
    flags = from_args(cls, args)
    check_ranges(flags)
    out = check_run_dir(flags.out, kind, resume=flags.resume, overwrite=flags.overwrite).create()
    torch.set_num_threads(flags.threads)
    device_of(flags.device)  # an unusable --device fails here, before any stage
    return flags, out


class Stages:
    """OUT/stages.json: the result of every finished stage, with its ``wall_time_s`` (what ``--resume`` skips)."""

    def __init__(self, out: Path, resume: bool, tag: str):
        self.path, self.tag, self.resumed, self.t0 = out / "stages.json", tag, resume, time.perf_counter()
        self.done: dict = json.loads(self.path.read_text()) if resume and self.path.exists() else {}

    def run(self, name: str, fn: Callable[..., dict], *args, **kwargs) -> dict:
        if name in self.done:
            print(f"[{self.tag}] {name}: done earlier, reusing its result")
            return self.done[name]
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        result["wall_time_s"] = time.perf_counter() - t0
        self.done[name] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2))
        tmp.replace(self.path)
        return result

    def wall_time_s(self) -> float:
        """The run's wall time: since start, or after ``--resume`` the sum over the recorded stages."""
        if self.resumed:
            return sum(v.get("wall_time_s", 0.0) for v in self.done.values())
        return time.perf_counter() - self.t0


@functools.cache
def held_out(task: str, n: int) -> tuple:
    """The fixed held-out set: up to ``n`` distinct problems of the task's held-out split, as dataset rows."""
    return task_dataset(get_task(task), n, "eval", seed=0).rows


def evaluate_checkpoint(checkpoint: str, task: str, n: int, *, k: int, max_completion_length: int, seed: int,
                        device: str | None) -> dict:
    """Held-out accuracy, pass@k and maj@k of a checkpoint (``nanoseek.evaluate``), per problem, and its size."""
    tok = Tokenizer.load(checkpoint)
    policy = Policy.load(checkpoint, tok.pad_id, tok.eos_id, device=device_of(device))
    r = evaluate(policy, tok.encode_prompt, tok.decode, list(held_out(task, n)),
                 Scorer([task_reward(get_task(task))], tokenizer=tok), k=k,
                 max_completion_length=max_completion_length, seed=seed)
    model = policy.model
    return {**{key: v for key, v in r.items() if key != "greedy_completions"}, "checkpoint": checkpoint,
            "params": model.num_parameters(), "active_params": model.num_active_parameters(),
            "attention": model.config.attention_type, "moe": model.config.n_routed_experts > 0}


def sft(out: Path, steps: int, resume: bool, **fields) -> dict:
    """An SFT stage of ``steps`` steps into ``out``; ``fields``: the rest of its ``SFTConfig``."""
    return finished(train(SFTConfig(out=str(out), steps=steps, resume=resume, keep=1, **fields)), "SFT")


def grpo(out: Path, resume: bool, **fields) -> dict:
    """A GRPO stage (``nanoseek.train.grpo``) into ``out``; ``fields`` are the rest of its ``GRPOConfig``."""
    return finished(train_grpo(GRPOConfig(out=str(out), resume=resume, **fields)), "GRPO")


def finished(summary: dict, stage: str) -> dict:
    """A training stage's summary; after a Ctrl-C (saved, returned early) the stage is unfinished: ``--resume``."""
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"{stage} stopped at step {summary['steps']}; continue with --resume")
    return summary


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 1-10 degrees of freedom


def mean_ci(xs: list[float], student: bool = False) -> tuple[float, float | None]:
    """Mean and 95% CI half-width q·s/√n (None for one value); q: 1.96, or ``student``: t at min(n − 1, 10) dof."""
    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, (T975[min(n, 11) - 2] if student else 1.96) * sd / math.sqrt(n)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a_i − b_i over the same problems and its 95% confidence half-width (``mean_ci``, normal)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: need two equal, non-empty lists, got {len(a)} and {len(b)}")
    mean, ci = mean_ci([x - y for x, y in zip(a, b)])
    return {"mean": mean, "ci95": math.inf if ci is None else ci, "n": len(a)}


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def write_report(out: Path, kind: str, report: dict, text: str, notes: list[str]) -> None:
    """OUT/report.json, OUT/report.md (``text``, then ``notes``), and ``text`` on stdout."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text("\n".join([f"# nanoseek {kind} report", "", text, "", *notes, ""]))
    print("\n" + text)
