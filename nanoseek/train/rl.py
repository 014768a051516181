"""The RL run shared by GRPO and PPO: step n is ``collect -> algorithm.prepare -> optimize``, run by the shared loop
``nanoseek.train.loop``. An algorithm (grpo.py, ppo.py) supplies ``prepare`` (advantages, old / reference log-probs),
``loss`` (one micro-batch), ``trainables`` (PPO's critic), ``state_dict`` / ``load_state_dict`` and ``cfg.beta``."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanoseek.checkpoint import load_checkpoint, resolve_model_dir, save_checkpoint
from nanoseek.cli_args import check_ranges, option
from nanoseek.datasets import Row
from nanoseek.distributed import global_std, init_distributed, is_main, reduce_floats
from nanoseek.evaluate import evaluate, scalar_metrics
from nanoseek.hf import atomic_write
from nanoseek.metrics import json_text
from nanoseek.policy import Policy
from nanoseek.rewards import PROCESS_REWARD_FNS, SkipFailures, reward_name
from nanoseek.rollout import CollectStats, Rollout, Sampling, Scorer, collect
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import RunConfig, StopFlag, narrow, run_loop, save, start_run
from nanoseek.train.optimize import OptimizeConfig, OptimizeStats, optimize
from nanoseek.train.rl_data import RLDataConfig, rl_data
from nanoseek.train.schedule import OptimConfig, adamw, lr_at, set_lr


@dataclass(frozen=True, kw_only=True)
class RLConfig(RunConfig, OptimConfig, RLDataConfig, OptimizeConfig):
    """The flags every RL algorithm shares: model, data and rewards, sampling, optimisation, evaluation, run."""

    model: str = option(help="nanoseek or Hugging Face checkpoint directory with tokenizer.json, or a run directory")
    eval_num_generations: int = option(4, "samples per held-out prompt for pass@k (0: greedy only)", min=0)
    save_best: str | None = option(None, "keep the best checkpoint by this eval metric in OUT/best",
                                   choices=("accuracy", "pass@k", "sample_accuracy", "reward"))
    num_generations: int = option(8, "G completions per prompt", min=1)
    prompts_per_step: int = option(8, "P prompts per step (global: split over ranks)", min=1)
    max_completion_length: int = option(16, "most tokens per completion", min=1)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, max=1)
    top_k: int | None = option(None, "sample from the k most likely tokens only", min=1)
    share_prompts: bool = option(True, "run a group's shared prompt once in the log-prob passes (exact)")
    log_completions_every: int = option(10, "samples to completions.jsonl every N steps and the last (0: never)", min=0)
    eval_on_start: bool = option(False, "also evaluate before training, logged as step 0 (needs --eval-every)")

    def validate(self) -> None:
        check_ranges(self)
        for flag, given in (("--save-best", self.save_best), ("--eval-on-start", self.eval_on_start)):
            if given and not self.eval_every:
                raise ValueError(f"{flag} needs --eval-every N (the held-out prompts and when to evaluate them)")
        if self.save_best in ("pass@k", "sample_accuracy") and not self.eval_num_generations:
            raise ValueError(f"--save-best {self.save_best} needs --eval-num-generations > 0")


class RLTrainer:
    """The policy, its optimizer, the reward functions and one algorithm; ``step(n)`` runs RL step n (1-based)."""

    def __init__(self, cfg: RLConfig, policy: Policy, tokenizer, algorithm_cls, rank: int = 0, world: int = 1):
        self.cfg, self.policy, self.tokenizer, self.rank, self.world = cfg, policy, tokenizer, rank, world
        self.data = rl_data(narrow(RLDataConfig, cfg), tokenizer)
        process = getattr(cfg, "process_reward", None)  # GRPO's process supervision: a built-in name or a callable
        process = PROCESS_REWARD_FNS[process] if isinstance(process, str) else process  # validated by GRPO.Params
        self.scorer = Scorer(self.data.reward_fns, cfg.reward_weights or None, tokenizer, process,
                             cfg.reward_timeout_s, self.data.train.columns)
        self.skipping = [fn for fn in self.data.reward_fns if isinstance(fn, SkipFailures)]  # --reward-errors skip
        self.sampling, self.optim = narrow(Sampling, cfg), narrow(OptimizeConfig, cfg)
        self.optimizer = adamw(policy.model, cfg)
        self.algorithm = algorithm_cls(narrow(algorithm_cls.Params, cfg), self.sampling, self.optim, policy)

    def prompts(self, step: int, round_: int = 0) -> list[Row]:
        """This rank's share of step ``step``'s P prompts (deterministic in seed, step and round: exact on resume)."""
        P = self.cfg.prompts_per_step
        rows = self.data.train.batch(step - 1, P, seed=self.cfg.seed, round_=round_)
        return rows[self.rank * P // self.world : (self.rank + 1) * P // self.world]

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, self.cfg.system_prompt)

    def evaluate(self, step: int) -> dict[str, float]:
        """``eval/...`` metrics on the held-out prompts (``nanoseek.evaluate``)."""
        cfg, held_out = self.cfg, self.data.held_out  # held_out's own columns: an --eval-dataset's may differ
        m = evaluate(self.policy, self.encode, self.tokenizer.decode, list(held_out.rows),
                     replace(self.scorer, columns=held_out.columns), [reward_name(f) for f in self.data.correct],
                     k=cfg.eval_num_generations, temperature=cfg.temperature,
                     max_completion_length=cfg.max_completion_length, seed=cfg.seed)
        return {f"eval/{k}": v for k, v in scalar_metrics(m).items()}

    def collect(self, step: int) -> tuple[Rollout, CollectStats]:
        base = (self.sampling.seed * 1_000_003 + step - 1) * 101
        for fn in self.skipping:  # count this step's failures, not the evaluations'
            fn.failed = 0
        return collect(self.policy, self.encode, self.tokenizer.decode, lambda r: self.prompts(step, r), self.scorer,
                       self.sampling, seed=lambda r: (base + r) * 64 + self.rank)

    def step(self, step: int) -> tuple[dict, Rollout]:
        """RL step ``step`` (1-based): sample and score, prepare, optimize. Returns (metrics, the rollout)."""
        cfg, t0 = self.cfg, time.perf_counter()
        set_lr(self.optimizer, lr_at(step - 1, cfg, cfg.steps))
        rollout, seen = self.collect(step)
        t_gen = time.perf_counter() - t0
        stats = OptimizeStats()
        rollout = self.algorithm.prepare(rollout, step, stats)
        trainables = [(self.policy.model, self.optimizer), *self.algorithm.trainables]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step - 1)
        optimize(self.policy, rollout, self.algorithm.loss, trainables, self.optim, gen, stats, cfg.max_grad_norm)
        return {**self.metrics(rollout, seen, stats, time.perf_counter() - t0), "generation_time": t_gen}, rollout

    def metrics(self, rollout: Rollout, seen: CollectStats, stats: OptimizeStats, dt: float) -> dict:
        """TRL's metric names where TRL has the quantity, over every rank."""
        passes, sums = self.cfg.num_iterations, stats.sums
        r = torch.tensor(seen.seen_rewards, dtype=torch.float64)
        lengths = rollout.batch.completion_lens.double()
        tok, n_c = sums["tokens"], float(len(lengths))
        ratios = {  # metric: (numerator, denominator), each summed over ranks; the metric is num / max(den, 1)
            "reward": (float(r.sum()), float(r.numel())),
            "frac_reward_zero_std": (float(seen.zero_std_groups), float(seen.groups)),
            "completions/mean_length": (float(lengths.sum()), n_c),
            "completions/clipped_ratio": (float(rollout.truncated.sum()), n_c),
            "entropy": (sums["entropy"], tok),
            "clip_ratio/low_mean": (sums["clip_low"], tok),
            "clip_ratio/high_mean": (sums["clip_high"], tok),
            "loss": (sums["loss"] / passes, 1.0),
            "num_tokens": (tok / passes, 0.0),
            "tokens_per_s": (float(lengths.sum()) / dt, 0.0),
            "tokens/processed_over_real": (float(stats.processed), float(stats.real)),
        }
        if self.sampling.dynamic_sampling:  # groups trained on, dropped (equal rewards, surplus), rounds (rank mean)
            kept = float(len(rollout.examples))
            ratios |= {"sampling/groups_kept": (kept, 0.0), "sampling/groups_dropped": (seen.groups - kept, 0.0),
                       "sampling/rounds": (seen.groups / self.cfg.prompts_per_step, 0.0)}
        if self.algorithm.cfg.beta > 0:
            ratios["kl"] = (sums["kl"], tok)
        if self.algorithm.trainables:  # PPO's critic: its value loss, the mean over ranks and passes
            ratios["value_loss"] = (sums["value_loss"] / passes, 1.0)
        for name, vals in seen.seen_per_fn.items():  # NaN: the function gave no value
            given = [v for v in vals if not math.isnan(v)]
            ratios[f"rewards/{name}/mean"] = (float(sum(given)), float(len(given)))
        ratios.update({f"rewards/{fn.__name__}/errors": (float(fn.failed), 0.0) for fn in self.skipping})
        if self.scorer.process_fn is not None:  # mean step reward, and the completions that got no step
            ratios["rewards/process/mean"] = (float(sum(seen.seen_steps)), float(len(seen.seen_steps)))
            ratios["rewards/process/frac_no_steps"] = (float(seen.no_steps), float(r.numel()))
        old = rollout.old_logp if rollout.old_logp is not None else stats.first_pass_logp
        gap = None if old is None else (old - rollout.sampler_logp).abs() * rollout.batch.completion_mask
        if gap is not None:  # the sampler's log-probs against the trainer's recomputed π_old
            ratios["sampling/logprob_diff/mean"] = (float(gap.sum()), float(rollout.batch.completion_mask.sum()))
        totals = reduce_floats([x for pair in ratios.values() for x in pair])
        m = {k: num / den if den else math.nan if k.removeprefix("rewards/").removesuffix("/mean") in seen.seen_per_fn
             else num for k, num, den in zip(ratios, totals[::2], totals[1::2])}  # NaN: a function gave no value
        lmin = reduce_floats([float(lengths.min()) if len(lengths) else math.inf], "min")[0]
        lmax, gap_max = reduce_floats([float(lengths.max()) if len(lengths) else 0.0,
                                       float(gap.max()) if gap is not None and gap.numel() else 0.0], "max")
        return m | {"reward_std": global_std(r), "completions/min_length": lmin if math.isfinite(lmin) else 0.0,
                    "completions/max_length": lmax, "step_time": dt, "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": sum(stats.grad_norms) / max(len(stats.grad_norms), 1),
                    **({} if gap is None else {"sampling/logprob_diff/max": gap_max})}


def train_rl(cfg: RLConfig, algorithm_cls) -> dict:
    """Run an RL algorithm: the summary, first and final reward, and with ``save_best`` OUT/best's record (``best``)."""
    cfg.validate()
    rank, world, device = init_distributed(cfg.device)

    def inputs() -> RLTrainer:
        model = str(resolve_model_dir(cfg.model))
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        tokenizer = Tokenizer.load(model)
        policy = Policy.load(model, tokenizer.pad_id, tokenizer.eos_id, device=device)
        policy.share_prompts = cfg.share_prompts
        return RLTrainer(replace(cfg, model=model), policy, tokenizer, algorithm_cls, rank, world)

    run, trainer = start_run(cfg, algorithm_cls.kind, inputs)
    cfg, model, state = trainer.cfg, trainer.policy.model, {"step": 0}
    run = replace(run, config=cfg)  # the run's config with --model resolved
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from, model, trainer.optimizer)
        trainer.algorithm.load_state_dict(state)
    best_json = run.dir / "best" / "best.json"
    best_metric = "eval/" + (cfg.save_best or "").replace("pass@k", f"pass@{cfg.eval_num_generations}")
    best = json.loads(best_json.read_text()) if run.resume_from is not None and best_json.is_file() else None
    rewards: list[float] = []

    def step(n: int, stop: StopFlag) -> tuple[dict, bool]:
        nonlocal best
        m, rollout = trainer.step(n)
        rewards.append(m["reward"])
        if is_main() and cfg.eval_every and (n % cfg.eval_every == 0 or n == cfg.steps):
            m.update(trainer.evaluate(n))
            if cfg.save_best and (best is None or m[best_metric] > best["value"]):
                best = {"metric": best_metric, "value": m[best_metric], "step": n}
                save_checkpoint(best_json.parent, n, model, state={"best": best}, keep=1, tokenizer=trainer.tokenizer)
                atomic_write(Path(best_json), json_text(best, indent=2))
        if is_main() and cfg.log_completions_every and (n % cfg.log_completions_every == 0 or n == cfg.steps):
            _log_completions(run.dir / "completions.jsonl", n, rollout, 4 * cfg.num_generations)
        return m, reduce_floats([float(stop.requested)], "max")[0] > 0

    summary = run_loop(run, int(state["step"]), step, lambda n: save(run, n, model, trainer.optimizer,
                                                                     trainer.tokenizer, trainer.algorithm.state_dict()),
                       (lambda: trainer.evaluate(0) if is_main() else {}) if cfg.eval_on_start else None)
    return {**summary, "first_reward": rewards[0] if rewards else None,
            "final_reward": rewards[-1] if rewards else None, **({"best": best} if cfg.save_best else {})}


def _log_completions(path: Path, step: int, rollout: Rollout, rows: int) -> None:
    """The first ``rows`` samples of a step: prompt, completion, reward, advantage (per token or not), gold answer."""
    with open(path, "a") as f:
        for i in range(min(rows, len(rollout))):
            ex = rollout.examples[int(rollout.batch.prompt_index[i])]
            adv = rollout.advantages[i]
            adv = adv[: int(rollout.batch.completion_lens[i])].tolist() if adv.dim() else float(adv)
            f.write(json_text({"step": step, "prompt": ex.prompt, "completion": rollout.texts[i],
                               "reward": float(rollout.rewards[i]), "advantage": adv, "answer": ex.answer}) + "\n")
