"""Run directories: ``check_run_dir`` at start (reads only), ``RunDirPlan.create()`` once the inputs are checked.

A run directory holds one run of one kind (pretrain, sft, grpo, ppo, demo, ...), recorded in ``nanoseek_run.json``
(without it: ``<kind>_config.json``, or ``stages.json`` for a demo). A command refuses a directory holding anything
else unless ``--resume`` (same kind: continue; empty: a new run) or ``--overwrite`` (delete first; never the working
directory, one of its parents, the home directory or a git checkout)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "nanoseek_run.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (a usage error: exit status 2)."""


def recorded_kind(path: str | Path) -> str | None:
    """The kind of run a directory holds: its marker, else its config file, else None."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["kind"])
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{marker} is not a nanoseek run marker (expected {{\"kind\": ...}}); delete it or "
                              "pass --overwrite") from None
    if (path / "stages.json").is_file():
        return "demo"
    configs = sorted(p.name for p in path.glob("*_config.json"))
    return configs[0].removesuffix("_config.json") if configs else None


def describe(path: Path) -> str:
    """What a directory holds, in a few words, for error messages."""
    from nanoseek.checkpoint import latest_checkpoint

    kind = recorded_kind(path)
    parts = [f"a run of `nanoseek {kind}`"] if kind else []
    if (latest := latest_checkpoint(path, verify=False)) is not None:
        parts.append(f"checkpoints up to {latest.name}")
    if (path / "config.json").exists():  # what resolve_model_dir takes for a model directory
        parts.append("a model (config.json / weights)")
    if not parts:
        names = sorted(p.name for p in path.iterdir())
        parts.append(f"{len(names)} file(s): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    return " and ".join(parts)


@dataclass(frozen=True)
class RunDirPlan:
    """What ``check_run_dir`` decided: ``clear`` the directory first; ``resume`` a run of ``kind`` found there."""

    path: Path
    kind: str
    clear: bool
    resume: bool

    def create(self) -> Path:
        """Rank 0 clears (--overwrite) and creates the directory and marker; every rank fails if it is not writable."""
        import torch

        from nanoseek.distributed import all_reduce_, barrier, is_main
        from nanoseek.hf import atomic_write

        barrier()  # every rank has checked the directory before rank 0 changes it
        error = None
        if is_main():
            try:
                if self.clear:
                    for child in self.path.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
                self.path.mkdir(parents=True, exist_ok=True)
                if not (self.resume and (self.path / MARKER).is_file()):
                    atomic_write(self.path / MARKER, json.dumps({"kind": self.kind}) + "\n")
            except OSError as e:
                error = RunDirError(f"run directory {self.path} is not writable ({e.strerror or e}); choose another "
                                    "--out")
        if all_reduce_(torch.tensor([float(error is not None)])).item():
            raise error or RunDirError(f"rank 0 could not prepare the run directory {self.path}")
        return self.path


def check_run_dir(path: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False) -> RunDirPlan:
    """Whether a ``kind`` run may use ``path`` (else RunDirError: what it holds, the flag allowing it). Reads only."""
    path = Path(path)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a run directory; choose another --out")
    if not path.exists() or not any(path.iterdir()):
        if resume:
            print(f"note: --resume: {path} holds no run yet; starting a new `nanoseek {kind}` run", file=sys.stderr)
        return RunDirPlan(path, kind, clear=False, resume=False)
    if overwrite:
        real, cwd = path.resolve(), Path.cwd().resolve()
        if real in (Path(real.anchor), Path.home().resolve(), cwd) or real in cwd.parents:
            raise RunDirError(f"--overwrite will not delete {path}: it is the filesystem root, the home directory, "
                              "the working directory or one of its parents; choose another --out")
        if (path / ".git").exists():
            raise RunDirError(f"--overwrite will not delete {path}: it is a git checkout; choose another --out")
        return RunDirPlan(path, kind, clear=True, resume=False)
    found = recorded_kind(path)
    if resume and found == kind:
        return RunDirPlan(path, kind, clear=False, resume=True)
    holds = describe(path)
    if resume:
        raise RunDirError(f"--out {path} holds {holds}, not a run of `nanoseek {kind}`, so --resume cannot "
                          "continue it; choose another --out, or pass --overwrite instead of --resume to delete it")
    allow = "--resume to continue it or " if found == kind else ""
    raise RunDirError(f"--out {path} already holds {holds}; pass {allow}--overwrite to delete it and start over, "
                      "or choose another --out")
