"""Per-step metrics: one JSON object per line in ``run_dir/metrics.jsonl`` (flushed each step) and a tqdm
progress bar with ETA. Only rank 0 logs under torchrun (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (or of ``run_dir/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train with --out DIR to write DIR/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clean(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


class MetricsLogger:
    """``log(step, **values)`` appends ``{"step": step, **values}``; ``start_step`` > 0 (a resume) first drops
    records after that step, which a crash may have left behind."""

    def __init__(self, run_dir: str | Path, total_steps: int, desc: str = "train", enabled: bool = True,
                 start_step: int = 0, progress: bool = True):
        self.enabled = enabled
        self.file = None
        self.bar = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if start_step and r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "lr") if isinstance(record.get(k), float | int)}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
