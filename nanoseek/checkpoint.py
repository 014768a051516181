"""Checkpoints: ``run_dir/checkpoints/step_{step:08d}/`` holds the model in Hugging Face format (config.json +
safetensors, so ``Transformer.from_pretrained`` and transformers read it), ``optimizer.pt``, ``state.pt``
(schedule position, RNG states, data position, step, ...) and the tokenizer files.

Writes are atomic: everything goes into a temporary directory that is renamed into place, then the
``latest`` pointer file is replaced (also by rename). A crash at any point leaves the previous checkpoint and
pointer intact; only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_PREFIX = "step_"


def _unwrap(model):
    """The module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer=None, state: dict | None = None, keep: int = 3,
                    tokenizer=None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and prune to the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _unwrap(model).save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **(state or {})}, tmp / "state.pt")
    if tokenizer is not None:
        tokenizer.save(tmp)
    if final.exists():  # re-saving a step: move the old one aside first, delete it once the new one is in place
        old = root / f".old_{final.name}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    pointer = root / f".latest_{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _prune(root, keep, final)
    return final


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / "state.pt").exists() and (path / "config.json").exists()


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if _complete(p))


def _prune(root: Path, keep: int, current: Path) -> None:
    for old in _step_dirs(root)[: -max(keep, 1)]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_*"):  # leftovers of crashed saves
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to, else the newest complete one, else None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if _complete(target):
            return target
    dirs = _step_dirs(root) if root.is_dir() else []
    return dirs[-1] if dirs else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory (with config.json) as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: not a model directory (config.json) nor a run directory with checkpoints/")
    return latest


def load_checkpoint(path: str | Path, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) in place from a checkpoint directory; return its ``state``."""
    from nanoseek.hf import _read_safetensors, from_hf_state_dict
    from nanoseek.model.transformer import Transformer

    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs config.json, weights and state.pt)")
    model = _unwrap(model)
    tensors = _read_safetensors(path)
    if isinstance(model, Transformer):
        tensors = from_hf_state_dict(tensors, model.config)
        model.load_state_dict(tensors, strict=True)
    else:  # a transformers model: its own names; tied weights are stored once
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                                  False) else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        opt_file = path / "optimizer.pt"
        if not opt_file.exists():
            raise FileNotFoundError(f"{opt_file} not found: this checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(torch.load(opt_file, weights_only=False))
    return torch.load(path / "state.pt", weights_only=False)
