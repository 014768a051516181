"""Per-step metrics: one JSON object per line in ``run_dir/metrics.jsonl`` (flushed each step), a tqdm progress
bar with ETA (without a terminal: a line every few steps), optionally TensorBoard. Only rank 0 logs under torchrun."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from nanoseek.hf import atomic_write

if TYPE_CHECKING:
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import Tokenizer


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines log: a torn last line (a killed run's) is dropped with a warning, any other an error."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                print(f"warning: {path}:{n}: dropping a torn last line: {line[:60]!r}", file=sys.stderr)
                break
            raise ValueError(f"{path}:{n}: corrupt log line ({e.msg} at column {e.colno}); fix or delete it") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (or of ``run_dir/metrics.jsonl``)."""
    path = Path(path) / "metrics.jsonl" if Path(path).is_dir() else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train with --out DIR to write DIR/metrics.jsonl")
    return read_jsonl(path)


def rewind_log(path: Path, step: int) -> list[dict]:
    """Cut a JSON-lines log back to (and return) its records of steps <= ``step``, atomically: no step logs twice."""
    if not path.exists():
        return []
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    atomic_write(path, "".join(json_text(r) + "\n" for r in kept))
    return kept


def finite(v):
    """``v`` as JSON data: NaN and inf -> None (JSON has neither), 0-d tensors -> numbers, in lists and dicts too."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list | tuple | dict):
        return {k: finite(x) for k, x in v.items()} if isinstance(v, dict) else [finite(x) for x in v]
    return v


def json_text(obj, **kwargs) -> str:
    """Strict JSON (non-finite numbers as null): what every file the library writes holds."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


RUN_LOGS = ("metrics.jsonl", "completions.jsonl")  # a run directory's per-step logs, rewound on resume
LOG_LINE = (("loss", "loss", ".4g"), ("val_bpb", "val/bpb", ".4g"), ("tok/s", "train/tokens_per_s", ",.0f"),
            ("tok/s", "tokens_per_s", ",.0f"), ("mfu", "train/mfu", ".2%"))  # (label, key, format) without a terminal


class MetricsLogger:
    """``log(step, **values)`` appends ``{"step": step, **values, "time": wall time across resumes}``; RUN_LOGS are
    first rewound to ``start_step`` (the checkpoint resumed from). Without a terminal, a line (loss, val bpb, tok/s,
    MFU, ETA) every ``log_every`` steps replaces the bar; ``report_to="tensorboard"``: run_dir/tensorboard too."""

    def __init__(self, run_dir: str | Path, total_steps: int, desc: str = "train", enabled: bool = True,
                 start_step: int = 0, progress: bool = True, log_every: int = 10, report_to: str = "none"):
        self.file = self.bar = self.writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = {name: rewind_log(run_dir / name, start_step) for name in RUN_LOGS}["metrics.jsonl"]
        self.time_offset = kept[-1].get("time", 0.0) if kept and start_step else 0.0
        self.start_step, self.total_steps, self.t0 = start_step, total_steps, time.perf_counter()
        self.file = (run_dir / "metrics.jsonl").open("a")
        self.log_every = log_every if progress and not sys.stderr.isatty() else 0
        if progress and not self.log_every:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--report-to tensorboard: pip install 'nanoseek[tensorboard]'") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, **values) -> None:
        if self.file is None:
            return
        elapsed = time.perf_counter() - self.t0
        record = finite({"step": step, **values, "time": self.time_offset + elapsed})
        self.file.write(json.dumps(record, allow_nan=False) + "\n")  # finite already
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, float | int) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "lr") if k in scalars}, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.log_every and step > self.start_step and (step % self.log_every == 0 or step == self.total_steps):
            eta = round(elapsed / (step - self.start_step) * (self.total_steps - step))
            shown = [f"{label} {scalars[key]:{fmt}}" for label, key, fmt in LOG_LINE if key in scalars]
            print(f"step {step}/{self.total_steps}", *shown, f"eta {eta // 60}m{eta % 60:02d}s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        for handle in (self.file, self.bar, self.writer):
            if handle is not None:
                handle.close()
        self.file = self.bar = self.writer = None


def greedy_samples(model: Transformer, tok: Tokenizer, prompts: list[str], max_new: int) -> list[str]:
    """Greedy continuations of text ``prompts`` (BOS by the tokenizer's rule), to log during training."""
    from nanoseek.generate import generate

    ids = [tok.encode(p, add_bos=True) for p in prompts]
    return [tok.decode(out) for out in generate(model, ids, max_new, stop_token_ids=tok.stop_ids)]
