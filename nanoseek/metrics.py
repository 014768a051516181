"""Per-step metrics: one JSON object per line in ``run_dir/metrics.jsonl`` (flushed each step) and a tqdm
progress bar with ETA. Only rank 0 logs under torchrun (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines log. A torn last line (the partial write of a killed run) is dropped with a
    warning naming file and line; a bad line anywhere else is an error naming them."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                print(f"warning: {path}:{n}: dropping a torn last line (an interrupted write): {line[:60]!r}",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}:{n}: corrupt log line ({e.msg} at column {e.colno}); fix or delete that "
                             "line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (or of ``run_dir/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train with --out DIR to write DIR/metrics.jsonl")
    return read_jsonl(path)


def rewind_log(path: str | Path, step: int) -> None:
    """Cut a JSON-lines log back to the records of steps <= ``step`` (0: none), so that a run resumed from
    checkpoint ``step`` logs every later step exactly once. Atomic: the old file stays until the new is in place."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _clean(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


RUN_LOGS = ("metrics.jsonl", "completions.jsonl")  # a run directory's per-step logs, rewound on resume


class MetricsLogger:
    """``log(step, **values)`` appends ``{"step": step, **values}``, steps counted from 1 (the N-th optimizer step
    logs step N). At start, every log of RUN_LOGS in ``run_dir`` is rewound to ``start_step``, the step of the
    checkpoint the run resumes from (0: a new run), dropping what a killed run logged after that checkpoint."""

    def __init__(self, run_dir: str | Path, total_steps: int, desc: str = "train", enabled: bool = True,
                 start_step: int = 0, progress: bool = True):
        self.file = self.bar = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        for name in RUN_LOGS:
            rewind_log(Path(run_dir) / name, start_step)
        self.file = (Path(run_dir) / "metrics.jsonl").open("a")
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, **values) -> None:
        if self.file is None:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "lr") if isinstance(record.get(k), float | int)}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        for handle in (self.file, self.bar):
            if handle is not None:
                handle.close()
        self.file = self.bar = None
