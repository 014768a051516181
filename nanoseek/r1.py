"""``nanoseek r1``: DeepSeek-R1's training pipeline (arXiv 2501.12948 §2.3-2.4) end to end on the built-in GSM8K-style
word problems (``nanoseek.tasks.gsm8k``), on a CPU in minutes:

1. cold-start SFT: an MLA + DeepSeekMoE + MTP model learns the ``#### N`` format from reference solutions;
2. reasoning RL: GRPO with an accuracy reward (the task's) and a format reward (``format_gsm8k``);
3. rejection sampling: K samples of training problems from the RL model, kept only when the answer is right, the
   format is right, every worked equation holds (``equations``: no lucky guesses) and the sample ended;
4. SFT of the RL model on the kept samples;
5. distillation: the final model's verified samples train a smaller dense student from scratch (MHA attention, no
   MoE, no MTP; the same tokenizer).

After every stage the model is evaluated on the same distinct held-out problems (greedy accuracy, sampled accuracy
at T=1, pass@k, maj@k: ``nanoseek.evaluate.evaluate``). OUT/report.md holds the table, with each stage's time;
a stage that does not help shows as such. Finished stages are recorded in OUT/stages.json (``--resume``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nanoseek.distributed import device_of

TASK = "gsm8k"
REWARDS = ("format_gsm8k",)  # GRPO: the task's accuracy reward first, then these
VERIFY = ("format_gsm8k", "equations")  # rejection sampling: the task's reward and these must all give 1.0
STUDENT = {"attention_type": "mha", "n_routed_experts": 0, "num_nextn_predict_layers": 0, "intermediate_size": 64}


@dataclass
class R1Config:
    """Budgets of one pipeline run (defaults: the full run; ``quick()``: the test run)."""

    preset: str = "tiny"
    seq_len: int = 160  # the longest prompt (< 90 characters) plus a completion of max_new_tokens, with BOS / EOS
    cold_sft_steps: int = 1000  # held-out greedy 7% at 250 steps, 16% at 500, 35% at 1000 (measured, seed 0)
    sft_batch: int = 32
    sft_lr: float = 3e-3
    grpo_steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8
    grpo_lr: float = 5e-5  # 2e-4 with 8 prompts per step fell from 35% to 22.5% held-out greedy (measured)
    max_new_tokens: int = 48
    rs_prompts: int = 1024  # rejection sampling: distinct training problems
    rs_samples: int = 4  # samples per problem
    rft_steps: int = 200  # SFT of the RL model on the kept samples
    rft_lr: float = 3e-4
    distill_prompts: int = 2048  # distillation: distinct training problems sampled from the final model
    distill_samples: int = 4
    student_steps: int = 1000
    student: dict = field(default_factory=lambda: dict(STUDENT))
    eval_n: int = 200
    eval_k: int = 4
    seed: int = 0
    device: str | None = None  # cpu, cuda or cuda:N (default: cuda when available)

    @classmethod
    def quick(cls, seed: int = 0) -> R1Config:
        # 500 SFT steps reach 14% greedy but too few verified samples to keep (measured: 0 of 512)
        return cls(cold_sft_steps=700, grpo_steps=5, prompts_per_step=4, num_generations=4, rs_prompts=256,
                   rs_samples=4, rft_steps=20, distill_prompts=256, distill_samples=4, student_steps=50, eval_n=50,
                   eval_k=2, seed=seed)


# ---------------------------------------------------------------------- stages
@functools.cache
def held_out_set(eval_n: int) -> tuple:
    from nanoseek.tasks import distinct_examples, get_task

    return tuple(distinct_examples(get_task(TASK), eval_n, "eval", seed=0))


def evaluate_checkpoint(checkpoint: str, cfg: R1Config) -> dict:
    """Held-out greedy / sampled accuracy, pass@k and maj@k of a checkpoint, and its parameter counts."""
    from nanoseek.evaluate import evaluate
    from nanoseek.model.transformer import Transformer
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import Tokenizer

    model = Transformer.from_pretrained(checkpoint).to(device_of(cfg.device))
    r = evaluate(model, Tokenizer.load(checkpoint), list(held_out_set(cfg.eval_n)), get_task(TASK), k=cfg.eval_k,
                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=False)
    return {"n": r["n"], "accuracy": r["accuracy"], "sample_accuracy": r.get("sample_accuracy"),
            f"pass@{cfg.eval_k}": r.get(f"pass@{cfg.eval_k}"), f"maj@{cfg.eval_k}": r.get(f"maj@{cfg.eval_k}"),
            "params": model.num_parameters(), "active_params": model.num_active_parameters(),
            "attention": model.config.attention_type, "moe": model.config.n_routed_experts > 0}


def _sft(cfg: R1Config, out: Path, steps: int, lr: float, resume: bool, *, init_from: str | None = None,
         data: str | None = None, overrides: dict | None = None) -> dict:
    from nanoseek.train.pretrain import TrainConfig, train

    tc = TrainConfig(mode="sft", preset=cfg.preset, overrides=dict(overrides or {}), init_from=init_from,
                     task=TASK, data=[data] if data else [], seq_len=cfg.seq_len, steps=steps,
                     batch_size=cfg.sft_batch, lr=lr, warmup=min(20, steps // 5), seed=cfg.seed, out=str(out),
                     resume=resume, keep=1, progress=False, device=cfg.device)
    summary = train(tc)
    if summary["interrupted"]:  # Ctrl-C: train saved a checkpoint; do not mark the stage done
        raise KeyboardInterrupt(f"SFT stopped at step {summary['steps']}; continue with --resume")
    return {"checkpoint": summary["checkpoint"], "steps": steps, "final_loss": summary["final_loss"]}


def _grpo(cfg: R1Config, out: Path, model_dir: str, resume: bool) -> dict:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    gc = GRPOConfig(model=model_dir, out=str(out), task=TASK, reward_funcs=list(REWARDS),
                    num_generations=cfg.num_generations, prompts_per_step=cfg.prompts_per_step,
                    max_completion_length=cfg.max_new_tokens, steps=cfg.grpo_steps, lr=cfg.grpo_lr, seed=cfg.seed,
                    resume=resume, keep=1, progress=False, log_completions_every=10, device=cfg.device)
    summary = train_grpo(gc)
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"GRPO stopped at step {summary['steps']}; continue with --resume")
    return {"checkpoint": str(resolve_model_dir(out)), "steps": cfg.grpo_steps,
            "first_reward": summary["first_reward"], "final_reward": summary["final_reward"]}


def _sample_verified(cfg: R1Config, model_dir: str, path: Path, n_prompts: int, n_samples: int, seed: int) -> dict:
    """``nanoseek sample --keep correct`` from ``model_dir`` on distinct training problems into ``path``."""
    from nanoseek.datasets import task_dataset
    from nanoseek.policy import Policy
    from nanoseek.rewards import get_reward_fn
    from nanoseek.sample import sample_dataset, write_rows
    from nanoseek.tasks import get_task, task_reward
    from nanoseek.tokenizer import load_tokenizer

    task = get_task(TASK)
    tok = load_tokenizer(model_dir)
    policy = Policy.load(model_dir, tok.pad_id, tok.eos_id, device=device_of(cfg.device))
    rows, summary = sample_dataset(policy, tok, task_dataset(task, n_prompts, "train", seed=seed),
                                   [task_reward(task), *map(get_reward_fn, VERIFY)], num_samples=n_samples,
                                   max_new_tokens=cfg.max_new_tokens, seed=seed, keep="correct")
    write_rows(path, rows)
    return {"data": str(path), **summary}


def _skip(stage: str, why: str) -> dict:
    print(f"[r1] {stage}: skipped: {why}")
    return {"skipped": why}


def run_pipeline(cfg: R1Config, out: Path, resume: bool = False) -> dict:
    """Every stage into ``out``; returns the report (also OUT/report.json and OUT/report.md)."""
    from nanoseek.demo import Stages

    t_start = time.perf_counter()
    (out / "r1_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages = Stages(out, resume, tag="r1")

    def evaluated(name: str, fn) -> dict:  # a training stage, then its held-out evaluation (timed apart)
        result = stages.run(name, fn)
        if "checkpoint" in result:
            print(f"[r1] evaluating {name} on {len(held_out_set(cfg.eval_n))} held-out problems")
            result["eval"] = stages.run(f"eval_{name}", lambda: evaluate_checkpoint(result["checkpoint"], cfg))
        return result

    print(f"[r1] 1/5 cold-start SFT ({cfg.cold_sft_steps} steps)")
    cold = evaluated("cold_sft", lambda: _sft(cfg, out / "1_cold_sft", cfg.cold_sft_steps, cfg.sft_lr, resume))
    print(f"[r1] 2/5 GRPO, accuracy + format rewards ({cfg.grpo_steps} steps)")
    rl = evaluated("grpo", lambda: _grpo(cfg, out / "2_grpo", cold["checkpoint"], resume))
    print(f"[r1] 3/5 rejection sampling ({cfg.rs_prompts} problems x {cfg.rs_samples})")
    kept = stages.run("rejection_sampling", lambda: _sample_verified(
        cfg, rl["checkpoint"], out / "3_rejection_sampling.jsonl", cfg.rs_prompts, cfg.rs_samples, cfg.seed))
    print(f"[r1] 4/5 SFT on the {kept['kept']} kept samples ({cfg.rft_steps} steps)")
    rft = evaluated("rft", lambda: _sft(cfg, out / "4_sft_on_kept", cfg.rft_steps, cfg.rft_lr, resume,
                                        init_from=rl["checkpoint"], data=kept["data"]) if kept["kept"] else
                    _skip("SFT on kept samples", "rejection sampling kept no sample"))
    teacher = rft.get("checkpoint", rl["checkpoint"])
    print(f"[r1] 5/5 distillation into a dense MHA student ({cfg.distill_prompts} problems x "
          f"{cfg.distill_samples}, {cfg.student_steps} steps)")
    dist_data = stages.run("distill_sampling", lambda: _sample_verified(
        cfg, teacher, out / "5_distill.jsonl", cfg.distill_prompts, cfg.distill_samples, cfg.seed + 1))
    student = evaluated("student", lambda: _sft(cfg, out / "5_student", cfg.student_steps, cfg.sft_lr, resume,
                                                data=dist_data["data"], overrides=cfg.student)
                        if dist_data["kept"] else _skip("distillation", "the teacher's samples were all rejected"))
    del student
    wall = sum(v.get("time_s", 0.0) for v in stages.done.values()) if resume else time.perf_counter() - t_start
    report = build_report(cfg, stages.done, wall)
    write_report(out, report)
    return report


# ---------------------------------------------------------------------- report
ROWS = (("cold_sft", "1. cold-start SFT", None), ("grpo", "2. + GRPO (accuracy + format)", None),
        ("rft", "3-4. + rejection sampling + SFT", "rejection_sampling"),
        ("student", "5. distilled dense MHA student", "distill_sampling"))


def build_report(cfg: R1Config, done: dict, wall_time_s: float) -> dict:
    rows = []
    for name, label, sampling in ROWS:
        stage = done.get(name, {})
        ev = done.get(f"eval_{name}")
        s = done.get(sampling, {}) if sampling else {}
        rows.append({"stage": name, "label": label, "eval": ev, "skipped": stage.get("skipped"),
                     "time_s": stage.get("time_s", 0.0) + s.get("time_s", 0.0),
                     "kept": s.get("kept"), "samples": s.get("samples")})
    return {"task": TASK, "heldout_problems": len(held_out_set(cfg.eval_n)), "seed": cfg.seed, "rows": rows,
            "wall_time_s": wall_time_s, "config": asdict(cfg)}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def summary_table(report: dict) -> str:
    k = report["config"]["eval_k"]
    lines = [f"| stage | model | greedy | sampled (T=1) | pass@{k} | maj@{k} | training samples kept | stage time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ev = r["eval"] or {}
        model = "—" if not ev else (f"{ev['attention'].upper()}{' + MoE' if ev['moe'] else ''}, "
                                    f"{ev['params'] / 1e3:.0f}k params ({ev['active_params'] / 1e3:.0f}k active)")
        kept = "" if r["kept"] is None else f"{r['kept']} / {r['samples']}"
        label = r["label"] + (f" (skipped: {r['skipped']})" if r["skipped"] else "")
        lines.append(f"| {label} | {model} | {_pct(ev.get('accuracy'))} | {_pct(ev.get('sample_accuracy'))} | "
                     f"{_pct(ev.get(f'pass@{k}'))} | {_pct(ev.get(f'maj@{k}'))} | {kept} | {r['time_s']:.0f} s |")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    table = summary_table(report)
    head = (f"nanoseek r1 — task {report['task']}, {report['heldout_problems']} distinct held-out problems, "
            f"seed {report['seed']}, wall time {report['wall_time_s']:.0f} s")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = ["# nanoseek r1 report", "", head, "", table, "",
          "Stage time includes the stage's sampling (rejection sampling, the teacher's samples for distillation), "
          "not the evaluation. Rejection sampling keeps a sample only if the final answer is right, the format is "
          "GSM8K's, every worked equation holds and it ended by itself.", ""]
    (out / "report.md").write_text("\n".join(md))
    print("\n" + head + "\n\n" + table)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run (the test's; about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/r1", help="run directory (stages, samples, report.md)")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue the interrupted one")
    parser.add_argument("--overwrite", action="store_true", help="delete the earlier run in --out and start over")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from nanoseek.rundir import prepare_run_dir

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    out = prepare_run_dir(args.out, "r1", resume=args.resume, overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    device_of(args.device)  # an unusable --device fails here, before any stage
    cfg = R1Config.quick(args.seed) if args.quick else R1Config(seed=args.seed)
    run_pipeline(replace(cfg, device=args.device), out, resume=args.resume)
    return 0
