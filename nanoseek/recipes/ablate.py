"""``nanoseek ablate``: the DeepSeek recipe's claims measured at small scale: each study's variants pretrain on the
same shards for the same steps with one learning rate, matched in FLOPs/token or parameters (``variants``); rl runs
GRPO and PPO from one SFT checkpoint. Each run is the stage "study/variant/seed" of OUT/stages.json (``--resume``
skips finished runs: ``--seeds 5`` reuses seeds 0-2); figures are means over seeds with 95% CIs (Student t)."""

from __future__ import annotations

import argparse
import multiprocessing
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint import resolve_model_dir
from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import option
from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare, read_index
from nanoseek.engine.engine import bytes_per_token
from nanoseek.flops import flops_per_token
from nanoseek.generate import run_engine
from nanoseek.metrics import read_metrics
from nanoseek.model.transformer import Transformer
from nanoseek.recipes import runner
from nanoseek.recipes.runner import RecipeArgs, Stages
from nanoseek.train.ppo import PPOConfig, train_ppo
from nanoseek.train.pretrain import TrainConfig, train

STUDIES = ("moe", "attention", "balance", "mtp", "rl")
TASK = "countdown"  # the rl study's task (the demo's)
CLAIMS = (*(("moe", "deepseekmoe", b, "val_bpb", True) for b in ("gshard", "dense-active", "dense-total")),
          ("attention", "mla", "mha", "val_bpb", True), ("attention", "mla", "gqa", "val_bpb", True),
          ("balance", "aux-free", "aux-loss", "val_bpb", True), ("balance", "aux-free", "aux-loss", "maxvio", True),
          ("mtp", "D=1", "D=0", "val_bpb", True), ("mtp", "D=2", "D=0", "val_bpb", True),
          ("rl", "grpo", "ppo", "accuracy", False), ("rl", "grpo", "ppo", "peak_rss_mb", True))
BALANCE = {"aux-free": dict(bias_gamma=1e-3, balance_alpha=1e-4), "aux-loss": dict(bias_gamma=0.0, balance_alpha=0.01)}
# every run's size and budgets (lr: for every variant; decode_context: attention's decode at batch 8 x this context)
FULL = dict(hidden=128, layers=4, expert=32, vocab=4096, documents=None, seq_len=256, batch=16, steps=100, lr=3e-3,
            eval_every=25, eval_tokens=16384, decode_context=2048, rl_sft_steps=300, rl_steps=30, eval_n=200)
LR_SWEEP = (1e-3, 3e-3, 1e-2)
QUICK = {**FULL, **dict(hidden=32, layers=2, expert=8, vocab=512, documents=120, seq_len=64, batch=4, steps=10,
                        eval_every=5, eval_tokens=512, decode_context=64, rl_sft_steps=10, rl_steps=2, eval_n=8)}


def solve(base: dict, key: str, measure: Callable[[dict], float], target: float, hi: int, unit: int = 1) -> dict:
    """``base`` with ``key`` = unit·n for the n in [1, hi] whose ``measure`` (increasing) is closest to ``target``."""
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

    def params(overrides: dict) -> int:
        return Transformer(ModelConfig.preset("tiny", **overrides)).num_parameters()

    dense, mha, wide = {**base, "n_routed_experts": 0}, {**base, "attention_type": "mha"}, 64 * s["expert"]
    if study == "moe":
        return {"deepseekmoe": base, "gshard": {**base, "n_routed_experts": 8, "n_shared_experts": 0,
                                                "moe_intermediate_size": 4 * s["expert"], "num_experts_per_tok": 2},
                "dense-active": solve(dense, "intermediate_size", flops, flops(base), wide),
                "dense-total": solve(dense, "intermediate_size", params, params(base), wide)}
    if study == "attention":
        return {"mla": base, **{name: solve({**mha, "num_key_value_heads": kv}, "head_dim", params, params(base), h, 2)
                                for name, kv in (("mha", 4), ("gqa", 2))}}
    return {"balance": {"aux-free": base, "aux-loss": base},
            "mtp": {f"D={d}": {**base, "num_nextn_predict_layers": d} for d in (0, 1, 2)}}[study]


def maxvio(records: list[dict]) -> list[list[float]]:
    """MaxVio per MoE layer at each step (V3 §4.5.2): the logged max_i load_i / mean load, minus 1."""
    return [[x - 1 for x in layer] for layer in zip(*(r["expert_load_max_mean"] for r in records
                                                       if r.get("expert_load_max_mean")))]


def decode(model: Transformer, prompts: list[list[int]], new_tokens: int, speculative: bool) -> dict:
    """Greedy decoding of the prompts as one batch: decode tok/s and the speculative acceptance per depth."""
    _, e = run_engine(model, prompts, new_tokens, speculative=speculative)
    return {"decode_tok_s": e.decode_tokens / max(e.decode_seconds, 1e-9),
            **{f"accept@{d + 1}": a / max(n, 1) for d, (a, n) in enumerate(zip(e.spec_accepted, e.spec_proposed))}}


def pretrain(study: str, variant: str, out: Path, corpus: Path, overrides: dict, *, s: dict, seed: int,
             device: str | None) -> dict:
    """One pretraining run (continued if interrupted), then its figures and curves: val bpb, sizes, KV bytes, MaxVio;
    attention and base runs: decode tok/s (random prompts); MTP: greedy speculative decoding of validation windows."""
    summary = runner.finished(train(TrainConfig(
        out=str(out), resume=True, keep=1, progress=False, preset="tiny", overrides=overrides, data_dir=str(corpus),
        eval_every=s["eval_every"], eval_tokens=s["eval_tokens"], seq_len=s["seq_len"], batch_size=s["batch"],
        steps=s["steps"], lr=s["lr"], warmup_steps=s["steps"] // 10, seed=seed, device=device,
        **BALANCE["aux-loss" if variant == "aux-loss" else "aux-free"])), "pretraining")
    records, tokens = read_metrics(out), s["batch"] * s["seq_len"]
    per_token = flops_per_token(ModelConfig.preset("tiny", **overrides), s["seq_len"])
    walls = np.cumsum([tokens / r["train/tokens_per_s"] for r in records])
    evals = [(r["step"] * tokens * per_token, t, r["val/bpb"]) for r, t in zip(records, walls) if "val/bpb" in r]
    model = Transformer.from_pretrained(summary["checkpoint"]).eval()
    figures = {"val_bpb": evals[-1][2], "flops_per_token": per_token, "train_tok_s": tokens * len(records) / walls[-1],
               "params": model.num_parameters(), "active_params": model.num_active_parameters(),
               "kv_bytes_per_token": bytes_per_token(model)}
    curves = {name: ([e[i] for e in evals], [e[2] for e in evals])
              for i, name in enumerate(("val bpb vs training FLOPs", "val bpb vs training wall time (s)"))}
    if vio := maxvio(records):  # per layer: the mean over the last quarter of training; the curve: mean over layers
        figures.update({f"maxvio[{i}]": float(np.mean(v[-max(1, len(v) // 4):])) for i, v in enumerate(vio)})
        figures["maxvio"] = float(np.mean([figures[f"maxvio[{i}]"] for i in range(len(vio))]))
        curves["MaxVio (mean over layers) vs step"] = (list(range(1, len(vio[0]) + 1)), np.mean(vio, 0).tolist())
    if study in ("attention", "base"):
        prompts = torch.randint(0, model.config.vocab_size, (8, s["decode_context"]),
                                generator=torch.Generator().manual_seed(seed))
        figures["decode_tok_s"] = decode(model, prompts.tolist(), 32, False)["decode_tok_s"]
    if len(model.mtp):
        ids = np.memmap(corpus / "val.bin", dtype=read_index(corpus)["dtype"], mode="r")
        spec = decode(model, [ids[i:i + 64].tolist() for i in np.linspace(0, len(ids) - 64, 8).astype(int)], 32, True)
        figures["spec_decode_tok_s"] = spec.pop("decode_tok_s")
        figures.update(spec)
        curves["acceptance vs draft depth"] = (list(range(1, len(spec) + 1)), list(spec.values()))
    return {"figures": figures, "curves": curves, "overrides": overrides}


def rl_train(algo: str, out: Path, sft_checkpoint: str, s: dict, seed: int, device: str | None) -> float:
    """GRPO or PPO from the SFT checkpoint; the process's peak resident memory (MiB, Linux: VmHWM)."""
    common = dict(model=sft_checkpoint, task=TASK, num_generations=4, prompts_per_step=8, max_completion_length=10,
                  steps=s["rl_steps"], lr=3e-4, seed=seed, keep=1, progress=False, device=device)
    if algo == "grpo":
        runner.grpo(out, True, **common)
    else:
        runner.finished(train_ppo(PPOConfig(out=str(out), resume=True, **common)), "PPO")
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def rl_run(algo: str, out: Path, sft_checkpoint: str, *, s: dict, seed: int, device: str | None) -> dict:
    """``rl_train`` in a fresh process (every run's peak memory from one start), then held-out greedy accuracy."""
    with multiprocessing.get_context("spawn").Pool(1, torch.set_num_threads, (torch.get_num_threads(),)) as pool:
        peak = pool.apply(rl_train, (algo, out, sft_checkpoint, s, seed, device))
    ev = runner.evaluate_checkpoint(str(resolve_model_dir(out)), TASK, s["eval_n"], k=1, max_completion_length=10,
                                    seed=seed, device=device)
    return {"figures": {"peak_rss_mb": peak, "accuracy": ev["accuracy"]}, "curves": {}}


def build_report(results: dict[str, dict[str, list[dict]]], s: dict, seeds: list[int]) -> tuple[dict, str]:
    """report.json's content and report.md's tables and verdicts (overlapping CIs: within noise)."""
    def cell(m: tuple[float, float | None]) -> str:
        return f"{m[0]:.4g}" + ("" if m[1] is None else f" ± {m[1]:.2g}")

    def verdict(a: tuple[float, float | None], b: tuple[float, float | None], lower_better: bool) -> str:
        if a[1] is None or b[1] is None or abs(a[0] - b[0]) <= a[1] + b[1]:
            return "within noise at this scale"
        return "holds" if (a[0] < b[0]) == lower_better else "does not hold"

    figures = {study: {v: {k: runner.mean_ci([r["figures"][k] for r in runs], student=True)
                           for k in runs[0]["figures"]} for v, runs in by_variant.items()}
               for study, by_variant in results.items()}
    claims = [{"claim": f"{study}: {a} beats {b} on {k} ({'lower' if lower else 'higher'} is better)",
               "verdict": verdict(figures[study][a][k], figures[study][b][k], lower),
               "numbers": f"{a} {cell(figures[study][a][k])} vs {b} {cell(figures[study][b][k])}"}
              for study, a, b, k, lower in CLAIMS if study in figures]
    parts = [f"nanoseek ablate — seeds {seeds}; mean ± 95% CI over seeds (Student t; none with one seed). One "
             f"learning rate for every variant, {s['lr']:g}: dense-active's best val bpb over {LR_SWEEP} (one seed; "
             "no per-variant tuning). Variants equal to the base model share its runs. FLOPs/token: `nanoseek.flops` "
             "(training, active experts only); dense widths and MHA/GQA head sizes are solved to match it or the "
             "parameters. maxvio[i]: MoE layer i (MTP's last), mean over the last quarter of training. wall_time_s: "
             "a run's, with its measurements. rl: peak_rss_mb: the training process's peak RSS (fresh; with torch)."]
    for study, by_variant in figures.items():
        keys = list(dict.fromkeys(k for f in by_variant.values() for k in f))
        parts += [f"## {study}", runner.table(["variant", *keys], [
            [v, *(cell(f[k]) if k in f else "—" for k in keys)] for v, f in by_variant.items()])]
    parts += ["## verdicts", "\n".join(f"- {c['claim']}: **{c['verdict']}** ({c['numbers']})" for c in claims)]
    return {"scale": s, "seeds": seeds, "figures": figures, "claims": claims}, "\n\n".join(parts)


def write_plots(out: Path, results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """One PNG per study, one panel per curve its runs recorded, each variant's mean over seeds."""
    from matplotlib.figure import Figure

    (out / "plots").mkdir(exist_ok=True)
    pretraining = {study: by_variant for study, by_variant in results.items() if study != "rl"}
    for study, by_variant in pretraining.items():
        panels = list(dict.fromkeys(c for runs in by_variant.values() for c in runs[0]["curves"]))
        fig = Figure(figsize=(5 * len(panels), 4), layout="tight")
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for v, runs in by_variant.items():
                if panel in runs[0]["curves"]:
                    ax.plot(*np.mean([r["curves"][panel] for r in runs], 0), "o-", label=v)
            ax.set(title=f"{study}: {panel}", xscale="log" if "FLOPs" in panel else "linear")
            ax.legend()
        fig.savefig(out / "plots" / f"{study}.png", dpi=100)
    return [f"plots/{study}.png" for study in pretraining]


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
    corpus, studies = Path(flags.data_dir or out / "corpus"), STUDIES if flags.study == "all" else (flags.study,)
    if flags.study != "rl":  # the corpus, then one learning-rate sweep of dense-active, used by every variant
        if not flags.data_dir:
            stages.run("corpus", prepare, PrepareConfig(corpus=flags.corpus, out=str(corpus), vocab_size=s["vocab"],
                                                        limit=s["documents"], val_per_mille=50))
        moe = variants("moe", s, read_index(corpus)["vocab_size"])
        sweep = {lr: stages.run(f"lr/{lr:g}", pretrain, "lr", "dense-active", out / f"lr/{lr:g}", corpus,
                                moe["dense-active"], s={**s, "lr": lr}, seed=flags.seed, device=flags.device)
                 for lr in LR_SWEEP}
        s = {**s, "lr": min(sweep, key=lambda lr: sweep[lr]["figures"]["val_bpb"])}
    results: dict[str, dict[str, list[dict]]] = {study: {} for study in studies}
    for study, seed in ((study, seed) for study in studies for seed in seeds):  # a run: stage "study/variant/seed"
        if study == "rl":
            sft = stages.run(f"rl/sft/{seed}", runner.sft, out / f"rl/sft/{seed}", s["rl_sft_steps"], True,
                             preset="tiny", task=TASK, seq_len=32, batch_size=32, lr=FULL["lr"], seed=seed,
                             overrides={"max_position_embeddings": 64}, progress=False, device=flags.device)
            runs = {a: (f"rl/{a}", rl_run, a, out / f"rl/{a}/{seed}", sft["checkpoint"]) for a in ("grpo", "ppo")}
        else:  # the variants equal to the base model (DeepSeekMoE, MLA, aux-free, D=0) share one run: "base"
            runs = {}
            for name, overrides in variants(study, s, read_index(corpus)["vocab_size"]).items():
                key = "base" if overrides == moe["deepseekmoe"] and name != "aux-loss" else f"{study}/{name}"
                runs[name] = (key, pretrain, key.split("/")[0], name, out / f"{key}/{seed}", corpus, overrides)
        for name, (key, fn, *fn_args) in runs.items():
            r = stages.run(f"{key}/{seed}", fn, *fn_args, s=s, seed=seed, device=flags.device)
            figures = {k: v for k, v in r["figures"].items() if study == "attention" or k != "decode_tok_s"}
            results[study].setdefault(name, []).append({**r, "figures": {**figures, "wall_time_s": r["wall_time_s"]}})
    report, text = build_report(results, s, seeds)
    report["plots"] = write_plots(out, results)
    runner.write_report(out, "ablate", report, text, [f"Wall time {stages.wall_time_s():.0f} s.", "",
                                                      *(f"![{p}]({p})" for p in report["plots"])])
    return 0
