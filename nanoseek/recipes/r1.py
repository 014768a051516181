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
at T=1, pass@k, maj@k: ``nanoseek.evaluate``). OUT/report.md holds the table, with each stage's time; a stage that
does not help shows as such. Finished stages are recorded in OUT/stages.json (``--resume``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.recipes import runner
from nanoseek.recipes.runner import RecipeArgs, Stages, pct

TASK = "gsm8k"
REWARDS = ("format_gsm8k",)  # GRPO: the task's accuracy reward first, then these
VERIFY = ("format_gsm8k", "equations")  # rejection sampling: the task's reward and these must all give 1.0
STUDENT = {"attention_type": "mha", "n_routed_experts": 0, "num_nextn_predict_layers": 0, "intermediate_size": 64}


@dataclass
class R1Config:
    """Budgets of one pipeline run (defaults: the full run; ``quick()``: the test run)."""

    preset: str = "tiny"
    seq_len: int = 160  # the longest prompt (< 90 characters) plus a completion, with BOS / EOS
    cold_sft_steps: int = 1000  # held-out greedy 7% at 250 steps, 16% at 500, 35% at 1000 (measured, seed 0)
    sft_batch: int = 32
    sft_lr: float = 3e-3
    grpo_steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8
    grpo_lr: float = 5e-5  # 2e-4 with 8 prompts per step fell from 35% to 22.5% held-out greedy (measured)
    max_completion_length: int = 48
    rs_prompts: int = 1024  # rejection sampling: distinct training problems
    rs_samples: int = 4  # samples per problem
    rft_steps: int = 200  # SFT of the RL model on the kept samples
    rft_lr: float = 3e-4
    distill_prompts: int = 2048  # distillation: distinct training problems sampled from the final model
    distill_samples: int = 4
    student_steps: int = 1000
    student: dict = field(default_factory=lambda: dict(STUDENT))
    eval_n: int = 200
    eval_num_generations: int = 4
    seed: int = 0
    device: str | None = None  # cpu, cuda or cuda:N (default: cuda when available)

    @classmethod
    def quick(cls, seed: int = 0) -> R1Config:
        # measured: 500 SFT steps keep 0 of 512 samples; the student, from scratch: 0% greedy at 50 steps, 16% at 400
        return cls(cold_sft_steps=700, grpo_steps=5, prompts_per_step=4, num_generations=4, rs_prompts=256,
                   rs_samples=4, rft_steps=20, distill_prompts=256, distill_samples=4, student_steps=400, eval_n=50,
                   eval_num_generations=2, seed=seed)


# ---------------------------------------------------------------------- stages
def _sft(cfg: R1Config, out: Path, steps: int, lr: float, resume: bool, *, init_from: str | None = None,
         data: str | None = None, overrides: dict | None = None) -> dict:
    s = runner.sft(out, steps, resume, preset=cfg.preset, overrides=dict(overrides or {}), model=init_from,
                   task=TASK, data=[data] if data else [], seq_len=cfg.seq_len, batch_size=cfg.sft_batch, lr=lr,
                   warmup_steps=min(20, steps // 5), seed=cfg.seed, progress=False, device=cfg.device)
    return {"checkpoint": s["checkpoint"], "steps": steps, "final_loss": s["final_loss"]}


def _grpo(cfg: R1Config, out: Path, model_dir: str, resume: bool) -> dict:
    from nanoseek.checkpoint import resolve_model_dir

    s = runner.grpo(out, resume, model=model_dir, task=TASK, reward_funcs=list(REWARDS),
                    num_generations=cfg.num_generations, prompts_per_step=cfg.prompts_per_step,
                    max_completion_length=cfg.max_completion_length, steps=cfg.grpo_steps, lr=cfg.grpo_lr,
                    seed=cfg.seed, keep=1, progress=False, log_completions_every=10, device=cfg.device)
    return {"checkpoint": str(resolve_model_dir(out)), "steps": cfg.grpo_steps, "first_reward": s["first_reward"],
            "final_reward": s["final_reward"]}


def _sample_verified(cfg: R1Config, model_dir: str, path: Path, n_prompts: int, n_samples: int, seed: int) -> dict:
    """``nanoseek sample --keep correct`` from ``model_dir`` on distinct training problems into ``path``."""
    from nanoseek.datasets import task_dataset
    from nanoseek.distributed import device_of
    from nanoseek.policy import Policy
    from nanoseek.rewards import get_reward_fn
    from nanoseek.sample import sample_dataset, write_rows
    from nanoseek.tasks import get_task, task_reward
    from nanoseek.tokenizer import Tokenizer

    task = get_task(TASK)
    tok = Tokenizer.load(model_dir)
    policy = Policy.load(model_dir, tok.pad_id, tok.eos_id, device=device_of(cfg.device))
    rows, summary = sample_dataset(policy, tok, task_dataset(task, n_prompts, "train", seed=seed),
                                   [task_reward(task), *map(get_reward_fn, VERIFY)], num_generations=n_samples,
                                   max_completion_length=cfg.max_completion_length, seed=seed, keep="correct")
    write_rows(path, rows)
    return {"data": str(path), **summary}


def _skip(stage: str, why: str) -> dict:
    print(f"[r1] {stage}: skipped: {why}")
    return {"skipped": why}


def run_pipeline(cfg: R1Config, out: Path, resume: bool = False) -> dict:
    """Every stage into ``out``; returns the report (also OUT/report.json and OUT/report.md)."""
    (out / "r1_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages = Stages(out, resume, tag="r1")

    def evaluated(name: str, fn) -> dict:  # a training stage, then its held-out evaluation (timed apart)
        result = stages.run(name, fn)
        if "checkpoint" in result:
            print(f"[r1] evaluating {name} on {len(runner.held_out(TASK, cfg.eval_n))} held-out problems")
            result["eval"] = stages.run(f"eval_{name}", lambda: runner.evaluate_checkpoint(
                result["checkpoint"], TASK, cfg.eval_n, k=cfg.eval_num_generations,
                max_completion_length=cfg.max_completion_length, seed=cfg.seed, device=cfg.device))
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
    evaluated("student", lambda: _sft(cfg, out / "5_student", cfg.student_steps, cfg.sft_lr, resume,
                                      data=dist_data["data"], overrides=cfg.student)
              if dist_data["kept"] else _skip("distillation", "the teacher's samples were all rejected"))
    report = build_report(cfg, stages.done, stages.wall_time_s())
    text = (f"nanoseek r1 — task {TASK}, {report['heldout_problems']} distinct held-out problems, seed {cfg.seed}, "
            f"wall time {report['wall_time_s']:.0f} s\n\n{summary_table(report)}")
    runner.write_report(out, "r1", report, text, [
        "Stage time includes the stage's sampling (rejection sampling, the teacher's samples for distillation), "
        "not the evaluation. Rejection sampling keeps a sample only if the final answer is right, the format is "
        "GSM8K's, every worked equation holds and it ended by itself."])
    return report


# ---------------------------------------------------------------------- report
ROWS = (("cold_sft", "1. cold-start SFT", None), ("grpo", "2. + GRPO (accuracy + format)", None),
        ("rft", "3-4. + rejection sampling + SFT", "rejection_sampling"),
        ("student", "5. distilled dense MHA student", "distill_sampling"))


def build_report(cfg: R1Config, done: dict, wall_time_s: float) -> dict:
    rows = []
    for name, label, sampling in ROWS:
        stage = done.get(name, {})
        s = done.get(sampling, {}) if sampling else {}
        rows.append({"stage": name, "label": label, "eval": done.get(f"eval_{name}"), "skipped": stage.get("skipped"),
                     "wall_time_s": stage.get("wall_time_s", 0.0) + s.get("wall_time_s", 0.0),
                     "kept": s.get("kept"), "samples": s.get("samples")})
    return {"task": TASK, "heldout_problems": len(runner.held_out(TASK, cfg.eval_n)), "seed": cfg.seed,
            "rows": rows, "wall_time_s": wall_time_s, "config": asdict(cfg)}


def summary_table(report: dict) -> str:
    k = report["config"]["eval_num_generations"]
    cells = []
    for r in report["rows"]:
        ev = r["eval"] or {}
        model = "—" if not ev else (f"{ev['attention'].upper()}{' + MoE' if ev['moe'] else ''}, "
                                    f"{ev['params'] / 1e3:.0f}k params ({ev['active_params'] / 1e3:.0f}k active)")
        kept = "" if r["kept"] is None else f"{r['kept']} / {r['samples']}"
        label = r["label"] + (f" (skipped: {r['skipped']})" if r["skipped"] else "")
        cells.append([label, model, *(pct(ev.get(c)) for c in ("accuracy", "sample_accuracy", f"pass@{k}",
                                                               f"maj@{k}")), kept, f"{r['wall_time_s']:.0f} s"])
    return runner.table(["stage", "model", "greedy", "sampled (T=1)", f"pass@{k}", f"maj@{k}",
                         "training samples kept", "stage time"], cells)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, RecipeArgs)
    parser.set_defaults(out="runs/r1")


def run(args: argparse.Namespace) -> int:
    flags, out = runner.start(RecipeArgs, args, "r1")
    cfg = R1Config.quick(flags.seed) if flags.quick else R1Config(seed=flags.seed)
    run_pipeline(replace(cfg, device=flags.device), out, resume=flags.resume)
    return 0
