"""``nanoseek plot RUN_DIR``: PNG curves of a run's metrics.jsonl (loss, MTP loss, lr, grad norm, expert load
imbalance, and whatever other numeric series the trainer logged), via the reusable ``plot_metrics``; when the records
carry ``tokens`` and ``time``, also the train and validation losses and bpb against tokens and wall time
(``plot_curves``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import from_args, option
from nanoseek.metrics import read_metrics

AXES = ("step", "tokens", "time")  # the x axes; never plotted as metrics


def series(records: list[dict], axis: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series against ``axis`` (records without it are skipped); a list value (per-layer numbers) becomes
    one series per index: ``name[i]``."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        step = r.get(axis)
        for key, v in r.items():
            if key in AXES or step is None:
                continue
            values = {key: v} if not isinstance(v, list) else {f"{key}[{i}]": x for i, x in enumerate(v)}
            for name, x in values.items():
                if isinstance(x, int | float) and not isinstance(x, bool):
                    xs, ys = out.setdefault(name, ([], []))
                    xs.append(step)
                    ys.append(float(x))
    return out


def plot_metrics(run_dir: str | Path, out: str | Path | None = None, keys: list[str] | None = None,
                 title: str | None = None) -> Path:
    """One panel per metric (per-layer series share a panel); returns the PNG path (default RUN_DIR/metrics.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    data = series(read_metrics(run_dir))
    if not data:
        raise ValueError(f"{run_dir}/metrics.jsonl has no numeric series to plot")
    panels: dict[str, list[str]] = {}
    for name in data:
        base = name.split("[")[0]
        if keys is None or base in keys:
            panels.setdefault(base, []).append(name)
    if not panels:
        raise ValueError(f"none of {keys} in {run_dir}/metrics.jsonl; it has {sorted({n.split('[')[0] for n in data})}")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (base, names) in zip(axes.flat, panels.items()):
        for name in names:
            ax.plot(*data[name], label=name if len(names) > 1 else None, lw=1.2)
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
        if base in ("loss", "mtp_loss") and min(min(data[n][1]) for n in names) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Losses and bpb (train and ``val/``) against tokens and against wall time, one row per metric; returns the
    PNG path (default RUN_DIR/curves.png), or None when the records lack ``tokens`` or ``time``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    by_x = {x: series(records, x) for x in ("tokens", "time")}
    names = [n for n in by_x["tokens"] if n.split("/")[-1] in ("loss", "bpb", "mtp_loss") and n in by_x["time"]]
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, (x, label) in zip(row, (("tokens", "tokens"), ("time", "wall time (s)"))):
            ax.plot(*by_x[x][name], lw=1.2, marker="o" if name.startswith("val/") else None, ms=3)
            ax.set_title(name)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class PlotConfig:
    """``nanoseek plot RUN_DIR``'s flags."""

    out: str | None = option(None, "PNG path (None: RUN_DIR/metrics.png; the curves go beside it as *_curves.png)")
    keys: list[str] | None = option(None, "only these metrics, e.g. loss lr (None: every scalar metric)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    add_flags(parser, PlotConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(PlotConfig, args)
    print(plot_metrics(args.run_dir, cfg.out, cfg.keys))
    curves = plot_curves(args.run_dir, Path(cfg.out).with_name(f"{Path(cfg.out).stem}_curves.png") if cfg.out else None)
    if curves is not None:
        print(curves)
    return 0
