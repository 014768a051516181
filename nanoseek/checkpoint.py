"""Checkpoints: ``run_dir/checkpoints/step_{step:08d}/`` holds the model in Hugging Face format, ``optimizer.pt``,
``state.pt`` (step, RNG states, data position, ...) and the tokenizer files. A save is written to a temporary
directory renamed into place, then the ``latest`` pointer is replaced: a crash leaves the previous checkpoint and
pointer intact. Resuming falls back from a damaged checkpoint to the newest intact one (``latest_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from nanoseek import hf
from nanoseek.config import ModelConfig

STEP_PREFIX = "step_"
# ModelConfig fields a resumed run may change: not the model's (initialisation, loss weight, unknowns, token ids)
NOT_THE_MODEL = ("extra", "initializer_range", "aux_loss_alpha", "bos_token_id", "eos_token_id", "pad_token_id")


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
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if isinstance(getattr(base := _unwrap(model), "config", None), ModelConfig) and tokenizer is not None:  # its ids
        hf.write_pretrained(base.state_dict(), base.config.replace(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id), tmp)
    else:
        base.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **(state or {})}, tmp / "state.pt")
    if tokenizer is not None:
        tokenizer.save(tmp)
    old = root / f".old_{final.name}_{os.getpid()}"
    if final.exists():  # re-saving a step: the old one is deleted once the new one is in place
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    hf.atomic_write(root / "latest", final.name + "\n")
    for stale in [*_step_dirs(root)[: -max(keep, 1)], *root.glob(".tmp_*")]:  # the oldest, crashed saves' leftovers
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / "state.pt").exists() and (path / "config.json").exists()


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if _complete(p))


def latest_checkpoint(run_dir: str | Path, verify: bool = True) -> Path | None:
    """The checkpoint ``latest`` points to, else the newest complete one, else None. With ``verify``, a damaged one
    is skipped for the next newest intact one (a warning names both); if all are damaged, a ValueError lists them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "latest"
    target = root / pointer.read_text(errors="replace").strip() if pointer.exists() else None
    candidates = sorted(_step_dirs(root)[::-1], key=lambda c: c != target)  # the pointer's target first
    if not verify or not candidates:
        return candidates[0] if candidates else None
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                print(f"warning: {damaged[0][0]} is damaged ({damaged[0][1]}); using {path}", file=sys.stderr)
            return path
        damaged.append((path, problem))
    raise ValueError(f"{root}: every checkpoint is damaged: " + "; ".join(f"{p.name}: {why}" for p, why in damaged))


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (damaged config.json, weights header, state.pt or optimizer.pt), or None."""
    try:
        json.loads((path / "config.json").read_text())
        for f in hf.weight_files(path):
            with hf.open_safetensors(f):  # the header only: nothing is read
                pass
        state = _load(path / "state.pt")
        if not isinstance(state, dict) or "step" not in state:
            return f"{path / 'state.pt'} holds no training state"
        if (path / "optimizer.pt").exists():
            with zipfile.ZipFile(path / "optimizer.pt"):  # torch.save's archive: a truncated one has no directory
                pass
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # config.json's (every other reader names its file)
        return f"{path / 'config.json'}: malformed JSON ({e})"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory (with config.json) as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (latest := latest_checkpoint(path)) is None:
        raise FileNotFoundError(f"{path}: not a model directory (config.json) nor a run directory with checkpoints/")
    return latest


def load_checkpoint(path: str | Path, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) in place; return ``state``. Another model's raises, naming each difference."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs config.json, weights and state.pt)")
    model = _unwrap(model)
    if isinstance(getattr(model, "config", None), ModelConfig):  # a nanoseek Transformer (else a transformers one)
        # both configs as config.json holds them (so a round trip compares equal), field by field
        configs = (ModelConfig.load(path / "config.json"), model.config)
        saved, ours = (ModelConfig.from_dict(c.to_dict()) for c in configs)
        diffs = [f"{name}: checkpoint {getattr(saved, name)!r} vs model {getattr(ours, name)!r}"
                 for name in (f.name for f in dataclasses.fields(ModelConfig))
                 if name not in NOT_THE_MODEL and getattr(saved, name) != getattr(ours, name)]
        if diffs:
            raise ValueError(f"checkpoint {path} is of another model ({'; '.join(diffs)}); resume with the same "
                             "model config, or start a new run directory")
        tensors, expected = hf.read_state_dict(path, model.config), model.state_dict()
    else:  # a transformers model: its own names; tied weights are stored once
        tensors, expected = hf.read_safetensors(path), model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            expected = {k: v for k, v in expected.items() if not k.endswith("lm_head.weight") or k in tensors}
    hf.check_state_dict(tensors, expected, path)
    model.load_state_dict(tensors, strict=False)  # check_state_dict has matched every name
    if optimizer is not None:
        opt_file = path / "optimizer.pt"
        if not opt_file.exists():
            raise FileNotFoundError(f"{opt_file} not found: this checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(_load(opt_file))
    return _load(path / "state.pt")


def _load(file: Path):
    """torch.load, with a damaged file named in a ValueError."""
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:  # a damaged pickle can fail in many ways; the file is what the user needs to know
        raise ValueError(f"{file}: unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None
