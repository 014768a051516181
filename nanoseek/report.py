"""``nanoseek plot RUN_DIR``: PNG curves of every numeric series in a run's metrics.jsonl (``plot_metrics``); when the
records carry ``tokens``, also the train and validation (``val/``) losses and bpb against tokens and wall time."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nanoseek import cli_args
from nanoseek.metrics import read_metrics

AXES = ("step", "tokens", "time")  # the x axes; never plotted as metrics
CURVES = ["loss", "mtp_loss", "bpb"]  # what `nanoseek plot` draws against tokens and wall time


def series(records: list[dict], axis: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series against ``axis`` (records without it skipped); a list (per-layer numbers): ``name[i]`` each."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        if (step := r.get(axis)) is None:
            continue
        for key, v in r.items():
            values = {key: v} if not isinstance(v, list) else {f"{key}[{i}]": x for i, x in enumerate(v)}
            for name, x in values.items():
                if key not in AXES and isinstance(x, int | float) and not isinstance(x, bool):
                    xs, ys = out.setdefault(name, ([], []))
                    xs.append(step)
                    ys.append(float(x))
    return out


def plot_metrics(run_dir: str | Path, out: str | Path | None = None, keys: list[str] | None = None,
                 title: str | None = None, axis: str = "step") -> Path:
    """One panel per metric (its per-layer and ``val/`` series too) against ``axis`` -> the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (data := series(read_metrics(run_dir), axis)):
        raise ValueError(f"{run_dir}/metrics.jsonl has no numeric series to plot")
    panels: dict[str, list[str]] = {}
    for name in data:
        base = name.split("[")[0].removeprefix("val/")
        if keys is None or base in keys:
            panels.setdefault(base, []).append(name)
    if not panels:
        raise ValueError(f"none of {keys} in {run_dir}/metrics.jsonl; it has {sorted({n.split('[')[0] for n in data})}")
    cols, rows = min(3, len(panels)), -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (base, names) in zip(axes.flat, panels.items()):
        for name in names:
            ax.plot(*data[name], label=name if len(names) > 1 else None, lw=1.2)
        ax.set(title=base if len(names) > 1 else names[0], xlabel={"time": "wall time (s)"}.get(axis, axis))
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
        if base in ("loss", "mtp_loss") and min(min(data[n][1]) for n in names) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / ("metrics.png" if axis == "step" else f"metrics_{axis}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class PlotConfig:
    out: str | None = cli_args.option(None, "PNG path (None: RUN_DIR/metrics.png; *_tokens.png, *_time.png beside it)")
    keys: list[str] | None = cli_args.option(None, "only these metrics, e.g. loss lr (None: every scalar metric)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    cli_args.add_arguments(parser, PlotConfig)


def run(args: argparse.Namespace) -> int:
    cfg = cli_args.from_args(PlotConfig, args)
    print(plot_metrics(args.run_dir, cfg.out, cfg.keys))
    if any("tokens" in r for r in read_metrics(args.run_dir)):
        for axis in ("tokens", "time"):
            out = Path(cfg.out).with_name(f"{Path(cfg.out).stem}_{axis}.png") if cfg.out else None
            print(plot_metrics(args.run_dir, out, cfg.keys or CURVES, axis=axis))
    return 0
