"""``nanoseek plot RUN_DIR``: PNG curves of a run's metrics.jsonl (loss, MTP loss, lr, grad norm, expert load
imbalance, and whatever other numeric series the trainer logged), via the reusable ``plot_metrics``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import from_args, option
from nanoseek.metrics import read_metrics


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Numeric per-step series; a list value (per-layer numbers) becomes one series per index: ``name[i]``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        step = r.get("step")
        for key, v in r.items():
            if key == "step":
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


@dataclass(frozen=True)
class PlotConfig:
    """``nanoseek plot RUN_DIR``'s flags."""

    out: str | None = option(None, "PNG path (None: RUN_DIR/metrics.png)")
    keys: list[str] | None = option(None, "only these metrics, e.g. loss lr (None: every scalar metric)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    add_flags(parser, PlotConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(PlotConfig, args)
    print(plot_metrics(args.run_dir, cfg.out, cfg.keys))
    return 0
