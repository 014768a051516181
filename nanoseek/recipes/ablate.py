"""``nanoseek ablate``: the DeepSeek recipe's claims measured at small scale. The variants of a study pretrain on
the same shards (``nanoseek prepare``) for the same steps with one learning rate, matched in FLOPs/token or
parameters (``variants``); rl runs GRPO and PPO from one SFT checkpoint on the demo's task, equal steps and samples.
Each run is the stage "study/variant/seed" of OUT/stages.json (``--resume`` skips finished runs: ``--seeds 5``
reuses seeds 0-2). Figures are means over seeds with 95% CIs (Student t); overlapping CIs are "within noise".
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint import resolve_model_dir
from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import option
from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare, read_index
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.engine import bytes_per_token
from nanoseek.flops import flops_per_token
from nanoseek.metrics import read_metrics
from nanoseek.model.transformer import Transformer
from nanoseek.recipes import runner
from nanoseek.recipes.runner import RecipeArgs, Stages
from nanoseek.train.ppo import PPOConfig, train_ppo
from nanoseek.train.pretrain import TrainConfig, train

STUDIES = ("moe", "attention", "balance", "mtp", "rl")
TASK = "countdown"  # the rl study's task (the demo's)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 1-10 degrees of freedom
# (study, a, b, figure, lower is better): the claim "a beats b on figure"
CLAIMS = (*(("moe", "deepseekmoe", b, "val_bpb", True) for b in ("gshard", "dense-active", "dense-total")),
          ("attention", "mla", "mha", "val_bpb", True), ("attention", "mla", "gqa", "val_bpb", True),
          ("balance", "aux-free", "aux-loss", "val_bpb", True), ("balance", "aux-free", "aux-loss", "maxvio", True),
          ("mtp", "D=1", "D=0", "val_bpb", True), ("mtp", "D=2", "D=0", "val_bpb", True),
          ("rl", "grpo", "ppo", "accuracy", False), ("rl", "grpo", "ppo", "peak_rss_mb", True))
BALANCE = {"aux-free": {"bias_gamma": 1e-3, "balance_alpha": 1e-4},
           "aux-loss": {"bias_gamma": 0.0, "balance_alpha": 0.01}}  # TrainConfig fields
# every run's model size and budgets; lr: one learning rate for every variant; decode_context: attention's decode
# tok/s at batch 8 x this context; documents: corpus documents prepared (None: all)
FULL = dict(hidden=128, layers=4, expert=32, vocab=4096, documents=None, seq_len=256, batch=16, steps=400, lr=3e-3,
            eval_every=50, eval_tokens=32768, decode_context=2048, rl_sft_steps=300, rl_steps=40, eval_n=200)
QUICK = {**FULL, **dict(hidden=32, layers=2, expert=8, vocab=512, documents=120, seq_len=64, batch=4, steps=10,
                        eval_every=5, eval_tokens=512, decode_context=64, rl_sft_steps=10, rl_steps=2, eval_n=8)}


def params(overrides: dict) -> int:
    with torch.device("meta"):
        return Transformer(ModelConfig.preset("tiny", **overrides)).num_parameters()


def solve(base: dict, key: str, measure, target: float, hi: int, unit: int = 1) -> dict:
    """``base`` with ``key`` = unit·n, n in [1, hi] bisected to bring ``measure`` (increasing in n) closest to
    ``target``."""
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if measure({**base, key: unit * mid}) < target else (lo, mid)
    return min(({**base, key: unit * n} for n in (lo, hi)), key=lambda o: abs(measure(o) - target))


def variants(study: str, s: dict, vocab: int) -> dict[str, dict]:
    """variant -> its ModelConfig overrides. moe: DeepSeekMoE (2 shared + 6 of 30 fine experts, V2 §2.2),
    GShard-style top-2 of 8 coarse experts (same active and total parameters, same router), dense FFNs solved to its
    FLOPs/token and to its parameters; attention: MLA, MHA and GQA (half the KV heads) with head size solved to MLA's
    parameters; balance: the same model (TrainConfig fields: ``BALANCE``); mtp: D = 0, 1, 2."""
    h = s["hidden"]
    base = dict(vocab_size=vocab, hidden_size=h, num_hidden_layers=s["layers"], num_attention_heads=4,
                q_lora_rank=h // 2, kv_lora_rank=h // 2, qk_nope_head_dim=h // 4, qk_rope_head_dim=h // 8,
                v_head_dim=h // 4, moe_intermediate_size=s["expert"], n_routed_experts=30, n_shared_experts=2,
                num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=0, num_nextn_predict_layers=0,
                max_position_embeddings=max(s["seq_len"], s["decode_context"] + 64))

    def flops(overrides: dict) -> float:
        return flops_per_token(ModelConfig.preset("tiny", **overrides), s["seq_len"])

    dense, mha, wide = {**base, "n_routed_experts": 0}, {**base, "attention_type": "mha"}, 64 * s["expert"]
    return {"moe": {"deepseekmoe": base, "gshard": {**base, "n_routed_experts": 8, "n_shared_experts": 0,
                                                    "moe_intermediate_size": 4 * s["expert"], "num_experts_per_tok": 2},
                    "dense-active": solve(dense, "intermediate_size", flops, flops(base), wide),
                    "dense-total": solve(dense, "intermediate_size", params, params(base), wide)},
            "attention": {"mla": base, **{name: solve({**mha, "num_key_value_heads": kv}, "head_dim", params,
                                                      params(base), h, 2) for name, kv in (("mha", 4), ("gqa", 2))}},
            "balance": {"aux-free": base, "aux-loss": base},
            "mtp": {f"D={d}": {**base, "num_nextn_predict_layers": d} for d in (0, 1, 2)}}[study]


def maxvio(records: list[dict]) -> list[list[float]]:
    """MaxVio per MoE layer at each step (V3 §4.5.2): the logged max_i load_i / mean load, minus 1."""
    return [[x - 1 for x in layer] for layer in zip(*(r["expert_load_max_mean"] for r in records
                                                       if r.get("expert_load_max_mean")))]


def decode(model: Transformer, prompts: list[list[int]], new_tokens: int, speculative: bool) -> dict:
    """Greedy decoding of the prompts as one batch: decode tok/s and the speculative acceptance per depth."""
    engine = Engine(model, len(prompts), max(map(len, prompts)) + new_tokens, speculative=speculative)
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=new_tokens))
    engine.run()
    return {"decode_tok_s": engine.decode_tokens / max(engine.decode_seconds, 1e-9),
            **{f"accept@{d + 1}": a / max(n, 1) for d, (a, n) in enumerate(zip(engine.spec_accepted,
                                                                                engine.spec_proposed))}}


@torch.no_grad()
def measure(study: str, checkpoint: str, corpus: Path, s: dict, seed: int) -> tuple[dict, dict]:
    """The trained model's figures and curves: sizes, KV bytes; attention: decode tok/s at batch 8 x
    ``decode_context`` (random prompts); MTP: greedy speculative decoding of 8 windows of the validation shard."""
    model = Transformer.from_pretrained(checkpoint).eval()
    figures = {"params": model.num_parameters(), "active_params": model.num_active_parameters(),
               "kv_bytes_per_token": bytes_per_token(model)}
    if study == "attention":
        prompts = torch.randint(0, model.config.vocab_size, (8, s["decode_context"]),
                                generator=torch.Generator().manual_seed(seed))
        figures["decode_tok_s"] = decode(model, prompts.tolist(), 32, False)["decode_tok_s"]
    if not len(model.mtp):
        return figures, {}
    ids = np.memmap(corpus / "val.bin", dtype=read_index(corpus)["dtype"], mode="r")
    spec = decode(model, [ids[i:i + 64].tolist() for i in np.linspace(0, len(ids) - 64, 8).astype(int)], 32, True)
    figures["spec_decode_tok_s"] = spec.pop("decode_tok_s")
    return {**figures, **spec}, {"acceptance vs draft depth": (list(range(1, len(spec) + 1)), list(spec.values()))}


def pretrain(study: str, variant: str, out: Path, corpus: Path, overrides: dict, *, s: dict, seed: int,
             device: str | None) -> dict:
    """One pretraining run (continued if interrupted); its figures and curves (metrics.jsonl, ``measure``)."""
    summary = train(TrainConfig(out=str(out), resume=True, keep=1, progress=False, preset="tiny", overrides=overrides,
                                data_dir=str(corpus), eval_every=s["eval_every"], eval_tokens=s["eval_tokens"],
                                seq_len=s["seq_len"], batch_size=s["batch"], steps=s["steps"], lr=s["lr"],
                                warmup_steps=s["steps"] // 10, seed=seed, device=device, **BALANCE.get(variant, {})))
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"pretraining stopped at step {summary['steps']}; continue with --resume")
    records, tokens = read_metrics(out), s["batch"] * s["seq_len"]
    per_token = flops_per_token(ModelConfig.preset("tiny", **overrides), s["seq_len"])
    walls = np.cumsum([tokens / r["tokens_per_s"] for r in records])
    evals = [(r["step"] * tokens * per_token, t, r["val/bpb"]) for r, t in zip(records, walls) if "val/bpb" in r]
    figures, curves = measure(study, summary["checkpoint"], corpus, s, seed)
    figures.update(val_bpb=evals[-1][2], flops_per_token=per_token, train_tok_s=tokens * len(records) / walls[-1])
    for i, name in enumerate(("val bpb vs training FLOPs", "val bpb vs training wall time (s)")):
        curves[name] = ([e[i] for e in evals], [e[2] for e in evals])
    if vio := maxvio(records):  # per layer: the mean over the last quarter of training; the curve: mean over layers
        figures.update({f"maxvio[{i}]": float(np.mean(v[-max(1, len(v) // 4):])) for i, v in enumerate(vio)})
        figures["maxvio"] = float(np.mean([figures[f"maxvio[{i}]"] for i in range(len(vio))]))
        curves["MaxVio (mean over layers) vs step"] = (list(range(1, len(vio[0]) + 1)), np.mean(vio, 0).tolist())
    return {"figures": figures, "curves": curves, "overrides": overrides}


def rl_run(algo: str, out: Path, sft_checkpoint: str, *, s: dict, seed: int, device: str | None) -> dict:
    """GRPO or PPO from the SFT checkpoint: peak resident memory while training, held-out greedy accuracy."""
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident size (VmHWM) to the current one
    common = dict(model=sft_checkpoint, task=TASK, num_generations=4, prompts_per_step=8, max_completion_length=10,
                  steps=s["rl_steps"], lr=3e-4, seed=seed, keep=1, progress=False, device=device)
    if algo == "grpo":
        runner.grpo(out, True, **common)
    elif train_ppo(PPOConfig(out=str(out), resume=True, **common))["interrupted"]:
        raise KeyboardInterrupt("PPO stopped; continue with --resume")
    peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024
    ev = runner.evaluate_checkpoint(str(resolve_model_dir(out)), TASK, s["eval_n"], k=1, max_completion_length=10,
                                    seed=seed, device=device)
    return {"figures": {"peak_rss_mb": peak, "accuracy": ev["accuracy"]}, "curves": {}}


def run_study(study: str, stages: Stages, out: Path, s: dict, corpus: Path, seeds: list[int],
              device: str | None) -> dict[str, list[dict]]:
    """variant -> its runs' results, one per seed (a run's result gets its ``wall_time_s`` figure)."""
    results: dict[str, list[dict]] = {}
    for seed in seeds:
        if study == "rl":
            sft = stages.run(f"rl/sft/{seed}", runner.sft, out / f"rl/sft/{seed}", s["rl_sft_steps"], True,
                             preset="tiny", task=TASK, seq_len=32, batch_size=32, lr=s["lr"], seed=seed,
                             overrides={"max_position_embeddings": 64}, progress=False, device=device)
            runs = {algo: (rl_run, algo, out / f"rl/{algo}/{seed}", sft["checkpoint"]) for algo in ("grpo", "ppo")}
        else:
            runs = {name: (pretrain, study, name, out / f"{study}/{name}/{seed}", corpus, overrides)
                    for name, overrides in variants(study, s, read_index(corpus)["vocab_size"]).items()}
        for name, (fn, *args) in runs.items():
            r = stages.run(f"{study}/{name}/{seed}", fn, *args, s=s, seed=seed, device=device)
            results.setdefault(name, []).append({**r, "figures": {**r["figures"], "wall_time_s": r["wall_time_s"]}})
    return results


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """Mean and 95% CI half-width over seeds (Student t; None for one seed)."""
    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, (T975[n - 2] if n <= len(T975) + 1 else 1.96) * sd / math.sqrt(n)


def verdict(a: tuple[float, float | None], b: tuple[float, float | None], lower_better: bool) -> str:
    if a[1] is None or b[1] is None or abs(a[0] - b[0]) <= a[1] + b[1]:
        return "within noise at this scale"
    return "holds" if (a[0] < b[0]) == lower_better else "does not hold"


def cell(m: tuple[float, float | None]) -> str:
    return f"{m[0]:.4g}" + ("" if m[1] is None else f" ± {m[1]:.2g}")


def build_report(results: dict[str, dict[str, list[dict]]], s: dict, seeds: list[int]) -> tuple[dict, str]:
    """report.json's content and report.md's tables and verdicts."""
    figures = {study: {v: {k: mean_ci([r["figures"][k] for r in runs]) for k in runs[0]["figures"]}
                       for v, runs in by_variant.items()} for study, by_variant in results.items()}
    claims = [{"claim": f"{study}: {a} beats {b} on {k} ({'lower' if lower else 'higher'} is better)",
               "verdict": verdict(figures[study][a][k], figures[study][b][k], lower),
               "numbers": f"{a} {cell(figures[study][a][k])} vs {b} {cell(figures[study][b][k])}"}
              for study, a, b, k, lower in CLAIMS if study in figures]
    parts = [f"nanoseek ablate — seeds {seeds}; mean ± 95% CI over seeds (Student t; none with one seed). One "
             "learning rate for every variant (no per-variant tuning)."]
    for study, by_variant in figures.items():
        keys = list(dict.fromkeys(k for f in by_variant.values() for k in f))
        parts += [f"## {study}", runner.table(["variant", *keys], [
            [v, *(cell(f[k]) if k in f else "—" for k in keys)] for v, f in by_variant.items()])]
    parts += ["## verdicts", "\n".join(f"- {c['claim']}: **{c['verdict']}** ({c['numbers']})" for c in claims)]
    return {"scale": s, "seeds": seeds, "figures": figures, "claims": claims}, "\n\n".join(parts)


def write_plots(out: Path, results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """One PNG per study, one panel per curve its runs recorded, each variant's mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    names = []
    for study, by_variant in results.items():
        panels = list(dict.fromkeys(c for runs in by_variant.values() for c in runs[0]["curves"]))
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for v, runs in by_variant.items():
                if panel in runs[0]["curves"]:
                    ax.plot(*np.mean([r["curves"][panel] for r in runs], 0), "o-", label=v)
            ax.set(title=f"{study}: {panel}", xscale="log" if "FLOPs" in panel else "linear")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{study}.png", dpi=100)
        plt.close(fig)
        names.append(f"plots/{study}.png")
    return names


@dataclass
class AblateArgs(RecipeArgs):
    study: str = option("all", "which study", choices=(*STUDIES, "all"))
    seeds: int | None = option(None, "seeds --seed .. --seed + N - 1 (default: 1 with --quick, else 3)", min=1)
    corpus: str = option("python-stdlib", "built-in corpus, prepared once into OUT/corpus")
    data_dir: str | None = option(None, "shards of `nanoseek prepare` to use instead of --corpus")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, AblateArgs)
    parser.set_defaults(out="runs/ablate")


def run(args: argparse.Namespace) -> int:
    flags, out = runner.start(AblateArgs, args, "ablate")
    s = QUICK if flags.quick else FULL
    seeds = list(range(flags.seed, flags.seed + (flags.seeds or (1 if flags.quick else 3))))
    stages = Stages(out, flags.resume, tag="ablate")
    corpus = Path(flags.data_dir or out / "corpus")
    if not flags.data_dir and flags.study != "rl":
        stages.run("corpus", prepare, PrepareConfig(corpus=flags.corpus, out=str(corpus), vocab_size=s["vocab"],
                                                    limit=s["documents"], val_per_mille=50, overwrite=True,
                                                    progress=False))
    results = {st: run_study(st, stages, out, s, corpus, seeds, flags.device)
               for st in (STUDIES if flags.study == "all" else (flags.study,))}
    report, text = build_report(results, s, seeds)
    report["plots"] = write_plots(out, results)
    runner.write_report(out, "ablate", report, text, [
        f"Wall time {stages.wall_time_s():.0f} s (wall_time_s: a run's, with its measurements). FLOPs/token: "
        "`nanoseek.flops.flops_per_token` (training, active experts only); dense widths and MHA/GQA head sizes are "
        "solved to match (the tables show the achieved values). maxvio[i]: MoE layer i, mean over the last quarter "
        "of training. rl: peak_rss_mb is the process's peak resident memory while training (VmHWM, reset before "
        "each run).", "", *(f"![{p}]({p})" for p in report["plots"])])
    return 0
