"""The run loop of every trainer (pretrain, SFT, GRPO, PPO): ``run_loop`` runs a trainer's step (``step(n, stop)
-> (metrics, stop)``, n from 1, ``stop`` agreed across ranks), logs, and saves every ``save_every`` steps, at the end,
at ``stop_at`` and after a first Ctrl-C (a second interrupts at once)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from nanoseek.checkpoint import latest_checkpoint, rng_state, save_checkpoint
from nanoseek.cli_args import option
from nanoseek.distributed import barrier, is_main
from nanoseek.metrics import MetricsLogger, json_text
from nanoseek.rundir import RunDirError, check_run_dir


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The run: its directory, length, checkpoints, seed and device (the same flags for every trainer)."""

    out: str | None = option(None, "run directory: metrics.jsonl, checkpoints/ (None: runs/<command>)")
    steps: int = option(100, "optimizer steps", min=1)
    save_every: int = option(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)", min=0)
    keep: int = option(2, "checkpoints kept", min=1)
    stop_at: int | None = option(None, "stop and save after this step, like a preemption (then --resume)", min=1)
    resume: bool = option(False, "continue exactly from --out's latest checkpoint (a new run if --out is empty)")
    overwrite: bool = option(False, "delete what --out holds and start over")
    resume_with_changes: bool = option(False, "--resume with changed settings (each segment's config is kept)")
    seed: int = option(0, "seed of the model init, the data order and sampling")
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")
    progress: bool = option(True, "show a progress bar (without a terminal: a log line every --log-every steps)")
    log_every: int = option(10, "steps between log lines when stderr is not a terminal", min=1)
    report_to: str = option("none", "also log to TensorBoard (the tensorboard extra)", choices=("none", "tensorboard"))


RESUMABLE = frozenset({"out", "steps", "save_every", "keep", "stop_at", "resume", "overwrite", "resume_with_changes",
                       "device", "progress", "log_every", "report_to", "eval_every", "sample_every",
                       "log_completions_every", "eval_on_start"})  # what --resume may change without asking


def narrow(cls: type, cfg: object):
    """The ``cls`` part of a command's config (the fields ``cls`` declares that ``cfg`` has), as a frozen ``cls``."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


class StopFlag:
    """``stop.requested`` after the first SIGINT inside ``with StopFlag() as stop``."""

    requested, previous = False, None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass(frozen=True)
class Run:
    """A claimed run directory, the command's whole config and the checkpoint to resume from (None: a new run)."""

    kind: str
    config: RunConfig
    dir: Path
    resume_from: Path | None


def start_run(cfg: RunConfig, kind: str, check_inputs: Callable[[], object]) -> tuple[Run, object]:
    """Check the run directory, then ``check_inputs()`` (all that can fail on bad input), then claim the directory."""
    plan = check_run_dir(cfg.out or f"runs/{kind}", kind, resume=cfg.resume, overwrite=cfg.overwrite)
    built = check_inputs()
    run_dir = plan.create()
    return Run(kind, cfg, run_dir, latest_checkpoint(run_dir) if plan.resume else None), built


def run_loop(run: Run, start: int, step: Callable[[int, StopFlag], tuple[dict, bool]],
             save: Callable[[int], Path | None], evaluate: Callable[[], dict] | None = None) -> dict:
    """Steps ``start + 1 .. steps`` (a new run with ``evaluate``: its metrics as step 0); returns the summary."""
    cfg, t0, config = run.config, time.perf_counter(), config_dict(run.config)
    if run.resume_from is not None and not cfg.resume_with_changes:  # compare with the checkpoint's settings
        old = torch.load(run.resume_from / "state.pt", map_location="cpu", weights_only=False, mmap=True)["config"]
        changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {v!r}" for k, v in config.items() if k in old and old[k] != v
                   and (k not in RESUMABLE or k == "eval_every" and bool(old[k]) != bool(v))]  # on/off: held-out split
        if changed:
            raise RunDirError(f"--resume: the run was trained with other settings ({'; '.join(changed)}); pass the "
                              "same values, or --resume-with-changes to continue with the new ones")
    if is_main() and start == 0:  # OUT/<kind>_config.json: the first segment's; <kind>_configs.jsonl: later ones
        (run.dir / f"{run.kind}_config.json").write_text(json_text(config, indent=2) + "\n")
    elif is_main():
        with open(run.dir / f"{run.kind}_configs.jsonl", "a") as f:
            f.write(json_text({"resumed_from_step": start, "config": config}) + "\n")
    logger = MetricsLogger(run.dir, cfg.steps, run.kind, enabled=is_main(), start_step=start,
                           progress=cfg.progress, log_every=cfg.log_every, report_to=cfg.report_to)
    if evaluate is not None and start == 0:
        logger.log(0, **evaluate())
    done, interrupted, saved = start, False, run.resume_from
    with StopFlag() as stop:
        for n in range(start + 1, cfg.steps + 1):
            metrics, interrupted = step(n, stop)
            logger.log(n, **metrics)
            done = n
            stopping = interrupted or n == cfg.stop_at
            if n == cfg.steps or stopping or (cfg.save_every and n % cfg.save_every == 0):
                saved = save(n)
            if stopping:
                if is_main():
                    print(f"stopped after step {n}; checkpoint {saved}; continue with --resume", file=sys.stderr)
                break
    logger.close()
    return {"steps": done, "wall_time_s": time.perf_counter() - t0, "interrupted": interrupted,
            "run_dir": str(run.dir), "checkpoint": str(saved) if saved else None,
            "resumed_from": str(run.resume_from) if run.resume_from else None}


def save(run: Run, step: int, model, optimizer, tokenizer, state: dict, fsdp: bool = False) -> Path | None:
    """Rank 0 writes checkpoint ``step``: RNG state, config, ``state`` (under FSDP all ranks gather it); all wait."""
    state, path = {"rng": rng_state(), "config": config_dict(run.config), **state}, None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if is_main():
            full = type(model)(model.config)
            full.load_state_dict(model_sd)
            path = save_checkpoint(run.dir, step, full, None, state, keep=run.config.keep, tokenizer=tokenizer)
            torch.save(optim_sd, path / "optimizer.pt")
    elif is_main():
        path = save_checkpoint(run.dir, step, model, optimizer, state, keep=run.config.keep, tokenizer=tokenizer)
    barrier()
    return path


def config_dict(cfg: object) -> dict:
    """A command config as JSON-safe data (a callable field recorded by its name)."""
    return {k: getattr(v, "__name__", type(v).__name__) if callable(v) else v for k, v in asdict(cfg).items()}
