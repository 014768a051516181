"""``nanoseek demo``: the whole DeepSeek recipe on a CPU in minutes, with the evidence.

1. task data (Countdown, ``nanoseek.tasks.countdown``) and the character tokenizer;
2. an SFT warm-start of a small MLA + DeepSeekMoE (aux-loss-free balancing) + MTP model, long enough that
   more SFT gains little (``--quick``: a short one);
3. held-out evaluation: greedy accuracy, maj@k, pass@k on a fixed set of distinct held-out problems;
4. GRPO from the SFT checkpoint;
5. evaluation again, and the baseline: SFT continued from the same checkpoint for a fixed number of steps
   (``continued_sft_steps``), both stages' steps and measured wall times in the table. Steps, not a wall-time
   budget, fix its length so that the same seed on the same CPU gives the same numbers (a time budget would move
   with the machine's load). Every difference is reported with a paired 95% confidence interval over the
   held-out problems;
6. OUT/: checkpoints, metrics.jsonl per stage, PNG plots, report.md and report.json, and a summary table.

Each finished stage is recorded in OUT/stages.json, so ``--resume`` skips finished stages and continues an
interrupted SFT or GRPO stage from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import option
from nanoseek.recipes import runner
from nanoseek.recipes.runner import RecipeArgs, Stages, paired_difference, pct

TASK = "countdown"
VALIDATION_SEED = 1_000  # GRPO's validation problems (training split) are drawn with this seed


@dataclass
class DemoConfig:
    """Budgets of one demo run (the defaults are the full run; ``quick()`` the CI run)."""

    preset: str = "small"
    sft_steps: int = 1200  # SFT's gains have flattened (+2-6 points per further 220 steps), pass@8 ~82%
    sft_batch: int = 64
    sft_lr: float = 3e-3
    grpo_steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8
    grpo_lr: float = 3e-4
    beta: float = 0.01
    continued_sft_steps: int = 220  # the baseline's length in steps; the table shows its wall time beside GRPO's
    max_completion_length: int = 10
    eval_n: int = 1000  # distinct held-out problems, at most (Countdown's held-out split has 316; 315 are drawn)
    eval_num_generations: int = 8
    curve_points: int = 4  # GRPO checkpoints on the held-out accuracy curve
    validation_n: int = 200  # GRPO's validation problems: distinct training-split problems, disjoint from held-out
    validate_every: int = 10  # GRPO evaluates greedy validation accuracy every N steps, keeping the best checkpoint
    grpo_checkpoint: str = "final"  # the GRPO row of the table: "final", or "best" by validation accuracy
    seed: int = 0
    device: str | None = None  # cpu, cuda or cuda:N (default: cuda when available)
    overrides: dict = field(default_factory=lambda: {"max_position_embeddings": 64})

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        return cls(sft_steps=300, grpo_steps=80, prompts_per_step=16, continued_sft_steps=175, eval_n=200,
                   eval_num_generations=4, curve_points=2, validation_n=100, validate_every=20, seed=seed)


# ---------------------------------------------------------------------- stages
def _eval(checkpoint: str, cfg: DemoConfig, desc: str) -> dict:
    print(f"[demo] evaluating {desc} on {len(runner.held_out(TASK, cfg.eval_n))} held-out problems")
    return runner.evaluate_checkpoint(checkpoint, TASK, cfg.eval_n, k=cfg.eval_num_generations,
                                      max_completion_length=cfg.max_completion_length, seed=cfg.seed,
                                      device=cfg.device)


def _sft(cfg: DemoConfig, out: Path, steps: int, init_from: str | None, resume: bool) -> dict:
    return runner.sft(out, steps, resume, preset=cfg.preset, overrides={} if init_from else dict(cfg.overrides),
                      model=init_from, task=TASK, seq_len=32, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                      warmup_steps=20, lr_schedule="constant", weight_decay=0.0, seed=cfg.seed, device=cfg.device)


def _grpo(cfg: DemoConfig, out: Path, model_dir: str, resume: bool) -> dict:
    return runner.grpo(out, resume, model=model_dir, task=TASK, num_generations=cfg.num_generations,
                       prompts_per_step=cfg.prompts_per_step, max_completion_length=cfg.max_completion_length,
                       steps=cfg.grpo_steps, lr=cfg.grpo_lr, beta=cfg.beta, seed=cfg.seed,
                       save_every=max(1, cfg.grpo_steps // cfg.curve_points), keep=cfg.curve_points + 1,
                       eval_every=cfg.validate_every, eval_dataset=str(out.parent / "validation.jsonl"),
                       eval_n=cfg.validation_n, eval_num_generations=0, save_best="accuracy", device=cfg.device)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())


def run_demo(cfg: DemoConfig, out: Path, resume: bool = False) -> dict:
    """Run every stage into ``out``; returns the report dict (also written to out/report.json)."""
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.datasets import task_dataset
    from nanoseek.sample import write_rows
    from nanoseek.tasks import examples, get_task

    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages = Stages(out, resume, tag="demo")
    task = get_task(TASK)

    def data() -> dict:  # 1. the task and the fixed held-out set, for the record
        held_out = runner.held_out(TASK, cfg.eval_n)
        write_rows(out / "heldout.jsonl", [{"prompt": r.prompt, "completion": r.completion, "answer": r.answer}
                                             for r in held_out])
        validation = task_dataset(task, cfg.validation_n, "train", seed=VALIDATION_SEED).rows
        write_rows(out / "validation.jsonl",  # training-split problems: disjoint from the held-out set
                     [{"prompt": r.prompt, "answer": r.answer} for r in validation])
        return {"task": TASK, "train_example": asdict(examples(task, 1, "train", seed=cfg.seed)[0]),
                "heldout": len(held_out), "validation": len(validation)}

    stages.run("data", data)
    sft = stages.run("sft", lambda: _sft(cfg, out / "sft", cfg.sft_steps, None, resume))  # 2.
    stages.run("eval_sft", lambda: _eval(sft["checkpoint"], cfg, "SFT"))  # 3.
    stages.run("grpo", lambda: _grpo(cfg, out / "grpo", sft["checkpoint"], resume))  # 4.
    final = str(_checkpoints(out / "grpo")[-1])
    best = json.loads((out / "grpo" / "best" / "best.json").read_text())  # by validation accuracy
    stages.run("eval_grpo_final", lambda: _eval(final, cfg, "SFT + GRPO (final)"))  # 5.
    stages.run("eval_grpo_best", lambda: {**_eval(str(resolve_model_dir(out / "grpo" / "best")), cfg,
                                                  f"SFT + GRPO (best by validation: step {best['step']})"),
                                          "step": best["step"], "validation_accuracy": best["value"]})
    points = [(0, sft["checkpoint"])] + [(int(p.name.split("_")[1]), str(p)) for p in _checkpoints(out / "grpo")]

    def curve() -> dict:  # held-out greedy and sampled accuracy at each saved GRPO step
        evals = [_eval(c, cfg, f"GRPO step {s}") for s, c in points]
        return {"steps": [s for s, _ in points], "accuracy": [e["accuracy"] for e in evals],
                "sample_accuracy": [e["sample_accuracy"] for e in evals]}

    stages.run("grpo_curve", curve)
    cont = stages.run("sft_continued", lambda: _sft(cfg, out / "sft_continued", cfg.continued_sft_steps,
                                                    sft["checkpoint"], resume))
    stages.run("eval_sft_continued", lambda: _eval(cont["checkpoint"], cfg, "SFT continued"))
    report = build_report(cfg, stages.done, stages.wall_time_s())
    write_outputs(out, report, stages.done)  # 6.
    return report


def build_report(cfg: DemoConfig, done: dict, wall_time_s: float) -> dict:
    k = cfg.eval_num_generations
    before, after, base = done["eval_sft"], done[f"eval_grpo_{cfg.grpo_checkpoint}"], done["eval_sft_continued"]
    final, best = done["eval_grpo_final"], done["eval_grpo_best"]

    def row(r: dict) -> dict:
        return {"accuracy": r["accuracy"], f"maj@{k}": r.get(f"maj@{k}"), f"pass@{k}": r.get(f"pass@{k}"),
                "sample_accuracy": r.get("sample_accuracy")}

    return {
        "task": TASK, "heldout_problems": before["n"], "seed": cfg.seed,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "accuracy_continued_sft": base["accuracy"],
        f"pass@{k}_before": before.get(f"pass@{k}"), f"maj@{k}_before": before.get(f"maj@{k}"),
        f"pass@{k}_after": after.get(f"pass@{k}"), f"maj@{k}_after": after.get(f"maj@{k}"),
        "sft": row(before), "grpo": row(after), "sft_continued": row(base),
        "grpo_checkpoint": cfg.grpo_checkpoint, "grpo_final": row(final),
        "grpo_best": {**row(best), "step": best["step"], "validation_accuracy": best["validation_accuracy"]},
        "sft_time_s": done["sft"]["wall_time_s"], "grpo_time_s": done["grpo"]["wall_time_s"],
        "sft_continued_time_s": done["sft_continued"]["wall_time_s"],
        "sft_steps": cfg.sft_steps, "grpo_steps": cfg.grpo_steps, "continued_sft_steps": cfg.continued_sft_steps,
        "gain": paired_difference(after["greedy_correct"], before["greedy_correct"]),
        "sample_gain": paired_difference(after["sample_correct"], before["sample_correct"]),
        "grpo_vs_continued_sft": paired_difference(after["greedy_correct"], base["greedy_correct"]),
        "grpo_vs_continued_sft_sampled": paired_difference(after["sample_correct"], base["sample_correct"]),
        "wall_time_s": wall_time_s, "config": asdict(cfg),
    }


# ---------------------------------------------------------------------- outputs
PLOTS = ("sft_loss.png", "grpo_reward_accuracy.png", "grpo_kl.png", "grpo_completion_length.png",
         "expert_load.png", "kv_cache_mla_vs_mha.png")


def write_plots(out: Path, done: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.metrics import read_metrics
    from nanoseek.model.transformer import Transformer
    from nanoseek.report import series

    sft, grpo = (series(read_metrics(out / d)) if (out / d / "metrics.jsonl").exists() else {} for d in ("sft", "grpo"))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "next-token CE"), ("mtp_loss", "MTP CE (depth 1)")):
        ax.plot(*sft.get(key, ([], [])), label=label)
    ax.set(xlabel="SFT step", ylabel="loss (nats/token)", yscale="log", title="SFT warm-start")
    ax.legend()
    save(fig, "sft_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*grpo.get("reward", ([], [])), label="train reward (sampled, T=1)", alpha=0.7)
    curve = done["grpo_curve"]
    ax.plot(curve["steps"], curve["accuracy"], "o-", label="held-out greedy accuracy")
    ax.plot(curve["steps"], curve["sample_accuracy"], "s-", label="held-out sampled accuracy (T=1)")
    ax.set(xlabel="GRPO step", ylabel="fraction correct", ylim=(0, 1), title="GRPO on Countdown")
    ax.legend()
    save(fig, "grpo_reward_accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*grpo.get("kl", ([], [])))
    ax.set(xlabel="GRPO step", ylabel="KL(π || π_ref) (k3, per token)", title="KL to the SFT reference")
    save(fig, "grpo_kl.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("completions/mean_length", "completions/min_length", "completions/max_length"):
        ax.plot(*grpo.get(key, ([], [])), label=key.split("/")[1])
    ax.set(xlabel="GRPO step", ylabel="completion tokens (with eos)", title="Completion length")
    ax.legend()
    save(fig, "grpo_completion_length.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in (n for n in sft if n.startswith("expert_load_max_mean[")):
        ax.plot(*sft[name], label=f"MoE layer {int(name.split('[')[1][:-1]) + 1}")
    ax.axhline(1.0, color="gray", ls=":", label="perfect balance")
    ax.set(xlabel="SFT step", ylabel="max / mean expert load",
           title="Expert load, aux-loss-free balancing (bias update)")
    ax.legend()
    save(fig, "expert_load.png")

    config = Transformer.from_pretrained(done["sft"]["checkpoint"]).config
    mha = config.replace(attention_type="mha", head_dim=config.v_head_dim)  # an MHA of the same shape
    lengths = [2**i for i in range(4, 14)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, style, label in ((config, "o-", "MLA (c_KV + k_R)"), (mha, "s-", "MHA, same heads")):
        per_token = Transformer(c).new_cache(1, 1).bytes_per_token()
        ax.plot(lengths, [per_token * n / 2**20 for n in lengths], style, label=f"{label}: {per_token} B/token")
    ax.set(xlabel="context length (tokens)", ylabel="KV cache (MiB, one sequence, fp32)", xscale="log",
           yscale="log", title="KV cache of the demo model: MLA vs MHA")
    ax.legend()
    save(fig, "kv_cache_mla_vs_mha.png")
    return [f"plots/{name}" for name in PLOTS]


def summary_table(report: dict) -> str:
    k = report["config"]["eval_num_generations"]
    rows = [("SFT warm-start", report["sft"], report["sft_time_s"], report["sft_steps"]),
            ("SFT + GRPO", report["grpo"], report["grpo_time_s"], report["grpo_steps"]),
            ("SFT + continued SFT", report["sft_continued"], report["sft_continued_time_s"],
             report["continued_sft_steps"])]
    return runner.table(["model", "greedy", "sampled (T=1)", f"maj@{k}", f"pass@{k}", "stage steps", "stage time"],
                        [[name, *(pct(r[c]) for c in ("accuracy", "sample_accuracy", f"maj@{k}", f"pass@{k}")),
                          str(steps), f"{t:.0f} s"] for name, r, t, steps in rows])


def checkpoint_note(report: dict) -> str:
    """Which GRPO checkpoint the table reports, and the other one's held-out accuracy."""
    best, final = report["grpo_best"], report["grpo_final"]
    which = "the final checkpoint" if report["grpo_checkpoint"] == "final" else \
        f"the best checkpoint by validation accuracy (step {best['step']})"
    return (f"The GRPO row is {which}. Held-out greedy / sampled: final {pct(final['accuracy'])} / "
            f"{pct(final['sample_accuracy'])}; best by validation (step {best['step']}, validation greedy "
            f"{pct(best['validation_accuracy'])} on {report['config']['validation_n']} training-split problems) "
            f"{pct(best['accuracy'])} / {pct(best['sample_accuracy'])}.")


def write_outputs(out: Path, report: dict, done: dict) -> None:
    """Plots, report.json, report.md, and the summary printed to stdout."""
    report["plots"] = write_plots(out, done)
    gain, vs = report["gain"], report["grpo_vs_continued_sft"]
    k = report["config"]["eval_num_generations"]

    def points(d: dict, sign: str = "+") -> str:
        return f"{100 * d['mean']:{sign}.1f} points (95% CI ±{100 * d['ci95']:.1f})"

    if abs(vs["mean"]) <= vs["ci95"]:
        verdict = f"GRPO and continued SFT are within noise of each other: {points(vs)}"
    elif vs["mean"] > 0:
        verdict = f"GRPO beats continued SFT by {points(vs, '')}"
    else:
        verdict = f"GRPO LOSES to continued SFT by {points({**vs, 'mean': -vs['mean']}, '')}"
    text = "\n\n".join([
        f"nanoseek demo — task {report['task']}, {report['heldout_problems']} distinct held-out problems, "
        f"seed {report['seed']}",
        summary_table(report),
        f"GRPO: held-out greedy accuracy {pct(report['accuracy_before'])} -> {pct(report['accuracy_after'])}, "
        f"{points(gain)}; sampled (T=1, {k} per problem) {pct(report['sft']['sample_accuracy'])} -> "
        f"{pct(report['grpo']['sample_accuracy'])}, {points(report['sample_gain'])}.",
        f"{verdict}, with continued SFT's {report['continued_sft_steps']} steps taking "
        f"{report['sft_continued_time_s']:.0f} s vs GRPO's {report['grpo_steps']} steps "
        f"{report['grpo_time_s']:.0f} s; sampled: GRPO − continued SFT "
        f"{points(report['grpo_vs_continued_sft_sampled'])}.",
        f"(CIs: paired over the {gain['n']} problems, normal approximation.) wall time {report['wall_time_s']:.0f} s",
        checkpoint_note(report),
    ])
    example = done["data"]["train_example"]
    runner.write_report(out, "demo", report, text, [
        f"Task: Countdown — reach the target with every given number once and + - * (e.g. prompt "
        f"`{example['prompt']}`, SFT target `{example['completion']}`; any valid equation is accepted).",
        "Model: preset `small` (MLA + DeepSeekMoE with aux-loss-free balancing + 1 MTP module), character "
        "tokenizer.", "", "## Plots", "", *[f"![{p}]({p})" for p in report["plots"]]])


# ---------------------------------------------------------------------- several seeds
TABLE_ROWS = (("sft", "SFT warm-start", "sft_time_s"), ("grpo", "SFT + GRPO", "grpo_time_s"),
              ("sft_continued", "SFT + continued SFT", "sft_continued_time_s"))


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def seeds_summary(reports: list[dict]) -> dict:
    """Every figure of the demo table over several seeds' reports: row -> column -> spread."""
    k = reports[0]["config"]["eval_num_generations"]
    cols = ("accuracy", "sample_accuracy", f"maj@{k}", f"pass@{k}")
    out = {name: {**{c: spread([r[name][c] for r in reports]) for c in cols},
                  "time_s": spread([r[time_key] for r in reports])} for name, _, time_key in TABLE_ROWS}
    out["gain"] = spread([r["gain"]["mean"] for r in reports])
    out["grpo_vs_continued_sft"] = spread([r["grpo_vs_continued_sft"]["mean"] for r in reports])
    return {"seeds": [r["seed"] for r in reports], "k": k, "rows": out}


def seeds_table(summary: dict) -> str:
    k = summary["k"]

    def cell(d: dict, pct: bool = True) -> str:
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.0f} s")
        return f"{f(d['mean'])} ± {f(d['std'])} ({f(d['min'])}–{f(d['max'])})"

    lines = [f"| model (mean ± std (min–max) over {len(summary['seeds'])} seeds) | greedy | sampled (T=1) | maj@{k} "
             f"| pass@{k} | stage time |", "|---|---|---|---|---|---|"]
    for name, label, _ in TABLE_ROWS:
        r = summary["rows"][name]
        lines.append(f"| {label} | {cell(r['accuracy'])} | {cell(r['sample_accuracy'])} | {cell(r[f'maj@{k}'])} | "
                     f"{cell(r[f'pass@{k}'])} | {cell(r['time_s'], pct=False)} |")
    gain, vs = summary["rows"]["gain"], summary["rows"]["grpo_vs_continued_sft"]
    lines += ["", f"GRPO − SFT, greedy: {100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f} points "
              f"({100 * gain['min']:+.1f} to {100 * gain['max']:+.1f}); GRPO − continued SFT: "
              f"{100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} points ({100 * vs['min']:+.1f} to "
              f"{100 * vs['max']:+.1f}); seeds {', '.join(map(str, summary['seeds']))}."]
    return "\n".join(lines)


def run_seeds(make_cfg, seeds: list[int], out: Path, resume: bool = False) -> dict:
    """The demo once per seed (OUT/seed_S/), then OUT/seeds.json and OUT/seeds.md: mean and spread of every
    figure in the table."""
    reports = []
    for seed in seeds:
        print(f"[demo] seed {seed} ({len(reports) + 1}/{len(seeds)})")
        (out / f"seed_{seed}").mkdir(exist_ok=True)
        reports.append(run_demo(make_cfg(seed), out / f"seed_{seed}", resume=resume))
    summary = seeds_summary(reports)
    table = seeds_table(summary)
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    (out / "seeds.md").write_text(f"# nanoseek demo over {len(seeds)} seeds\n\n{table}\n")
    print("\n" + table)
    return summary


# ---------------------------------------------------------------------- CLI
@dataclass
class DemoArgs(RecipeArgs):
    seeds: int = option(1, "run the demo for N seeds (--seed, --seed + 1, ...) and report the mean and spread of "
                        "every figure (OUT/seeds.md)", min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, DemoArgs)
    parser.set_defaults(out="runs/demo")


def run(args: argparse.Namespace) -> int:
    flags, out = runner.start(DemoArgs, args, "demo")
    base = DemoConfig.quick if flags.quick else DemoConfig

    def make_cfg(seed: int) -> DemoConfig:
        return replace(base(seed=seed), device=flags.device)

    if flags.seeds > 1:
        run_seeds(make_cfg, list(range(flags.seed, flags.seed + flags.seeds)), out, resume=flags.resume)
    else:
        run_demo(make_cfg(flags.seed), out, resume=flags.resume)
        print(f"\nserve the trained model: nanoseek serve --model {out / 'grpo'}   then open http://127.0.0.1:8000/")
    return 0
