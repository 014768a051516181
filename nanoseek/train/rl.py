"""The RL run shared by GRPO and PPO: one step is ``collect -> algorithm.prepare -> optimize``; ``train_rl`` runs
steps in the shared run loop (``nanoseek.train.loop``: checkpoints, exact resume, metrics, Ctrl-C).

An algorithm (GRPO in grpo.py, PPO in ppo.py), built from its ``Params``, the ``Sampling``, the ``OptimizeConfig``
and the policy, supplies only what differs: ``prepare`` (advantages, old / reference log-probs), ``loss`` (one
micro-batch's loss and statistic sums), ``trainables`` (PPO's critic and its optimizer), ``state_dict`` /
``load_state_dict`` (checkpoint state), ``metrics`` and ``cfg.beta``. Each stage gets the small frozen config it
reads, cut once from the command's flags (``nanoseek.train.loop.narrow``). Steps count from 1 everywhere.
"""

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
from nanoseek.distributed import init_distributed, is_main, reduce_floats
from nanoseek.policy import Policy
from nanoseek.rewards import get_process_reward_fn, reward_name
from nanoseek.rollout import CollectStats, Rollout, Sampling, Scorer, collect
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import RunConfig, StopFlag, config_dict, narrow, run_loop, save, start_run
from nanoseek.train.optimize import OptimizeConfig, OptimizeStats, TokenCounter, Trainable, optimize
from nanoseek.train.rl_data import RLDataConfig, rl_data
from nanoseek.train.schedule import OptimConfig, lr_at, set_lr


@dataclass(frozen=True, kw_only=True)
class RLConfig(RunConfig, OptimConfig, RLDataConfig, OptimizeConfig):
    """The flags every RL algorithm shares: model, data and rewards, sampling, optimisation, evaluation, run."""

    model: str = option(help="nanoseek or Hugging Face checkpoint directory with tokenizer.json, or a run directory")
    eval_num_generations: int = option(4, "samples per held-out prompt for pass@k (0: greedy only)", min=0)
    save_best: str | None = option(None, "keep the best checkpoint by this eval metric in OUT/best (accuracy, "
                                   "pass@k, sample_accuracy, reward)",
                                   choices=("accuracy", "pass@k", "sample_accuracy", "reward"))
    num_generations: int = option(8, "G completions per prompt", min=1)
    prompts_per_step: int = option(8, "P prompts per step (global: split over ranks)", min=1)
    max_completion_length: int = option(16, "most tokens per completion", min=1)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, max=1)
    top_k: int | None = option(None, "sample from the k most likely tokens only", min=1)
    share_prompts: bool = option(True, "run a group's shared prompt once in the log-prob passes (exact)")
    log_completions_every: int = option(10, "write samples to completions.jsonl every N steps (0: never)", min=0)

    def validate(self) -> None:
        check_ranges(self)
        if self.save_best and not self.eval_every:
            raise ValueError("--save-best needs --eval-every N (the best checkpoint is chosen by the evaluations)")
        if self.save_best in ("pass@k", "sample_accuracy") and not self.eval_num_generations:
            raise ValueError(f"--save-best {self.save_best} needs --eval-num-generations > 0 (samples per "
                             "held-out prompt)")

    @property
    def best_metric(self) -> str:
        """The metrics.jsonl key ``--save-best`` compares (``eval/pass@4`` for pass@k with --eval-num-generations 4)."""
        return "eval/" + (self.save_best or "").replace("pass@k", f"pass@{self.eval_num_generations}")


class RLTrainer:
    """The policy, its optimizer, the reward functions and one algorithm; ``step(n)`` runs RL step n (1-based)."""

    def __init__(self, cfg: RLConfig, policy: Policy, tokenizer, algorithm_cls, rank: int = 0, world: int = 1):
        self.cfg, self.policy, self.tokenizer, self.rank, self.world = cfg, policy, tokenizer, rank, world
        self.data = rl_data(narrow(RLDataConfig, cfg), tokenizer)
        fns = self.data.reward_fns
        process = getattr(cfg, "process_reward", None)  # GRPO's process supervision: a built-in name or a callable
        process = get_process_reward_fn(process) if isinstance(process, str) else process
        self.scorer = Scorer(fns, cfg.reward_weights or [1.0] * len(fns), tokenizer, process,
                             cfg.reward_timeout_s, self.data.train.columns)
        self.sampling, self.optim = narrow(Sampling, cfg), narrow(OptimizeConfig, cfg)
        self.opt = narrow(OptimConfig, cfg)
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.algorithm = algorithm_cls(narrow(algorithm_cls.Params, cfg), self.sampling, self.optim, policy)

    # -------------------------------------------------------------- data
    def prompts(self, step: int, round_: int = 0) -> list[Row]:
        """This rank's share of step ``step``'s P prompts (deterministic in seed, step and round: exact on resume)."""
        P = self.cfg.prompts_per_step
        rows = self.data.train.batch(step - 1, P, seed=self.cfg.seed, round_=round_)
        return rows[self.rank * P // self.world : (self.rank + 1) * P // self.world]

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, self.cfg.system_prompt)

    def evaluate(self, step: int) -> dict[str, float]:
        """``eval/...`` metrics on the held-out prompts (``nanoseek.evaluate.evaluate_prompts``)."""
        from nanoseek.evaluate import evaluate_prompts

        cfg = self.cfg
        held_out = self.data.held_out  # its own columns: an --eval-dataset's may differ from the training prompts'
        m = evaluate_prompts(self.policy, self.encode, self.tokenizer.decode, list(held_out.rows),
                             replace(self.scorer, columns=held_out.columns),
                             [reward_name(f) for f in self.data.correct], k=cfg.eval_num_generations,
                             temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
                             seed=cfg.seed)
        return {f"eval/{k}": v for k, v in m.items()}

    def collect(self, step: int) -> tuple[Rollout, CollectStats]:
        base = (self.sampling.seed * 1_000_003 + step - 1) * 101
        return collect(self.policy, self.encode, self.tokenizer.decode, lambda r: self.prompts(step, r), self.scorer,
                       self.sampling, seed=lambda r: (base + r) * 64 + self.rank)

    # -------------------------------------------------------------- one step
    def step(self, step: int) -> tuple[dict, Rollout]:
        """RL step ``step`` (1-based): sample and score, prepare, optimize. Returns (metrics, the rollout)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        set_lr(self.optimizer, lr_at(step - 1, self.opt, cfg.steps))
        rollout, seen = self.collect(step)
        t_gen = time.perf_counter() - t0
        counter = TokenCounter()
        rollout = self.algorithm.prepare(rollout, step, counter)
        trainables = [Trainable(m, o, cfg.max_grad_norm)
                      for m, o in [(self.policy.model, self.optimizer), *self.algorithm.trainables()]]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step - 1)
        stats = optimize(self.policy, rollout, self.algorithm.loss, trainables, self.optim, gen, counter)
        m = self.metrics(step, rollout, seen, stats, counter, time.perf_counter() - t0, t_gen)
        return {**m, **self.algorithm.metrics(rollout, stats)}, rollout

    def metrics(self, step: int, rollout: Rollout, seen: CollectStats, stats: OptimizeStats, counter: TokenCounter,
                dt: float, t_gen: float) -> dict:
        """TRL's metric names where TRL has the quantity; sums gathered over ranks."""
        passes = self.cfg.num_iterations
        r = torch.tensor(seen.seen_rewards, dtype=torch.float64)
        lengths = rollout.batch.completion_lens.double()
        tok = stats.sums.get("tokens", 0.0)
        s, s2, n, zero, groups, tok, kl, lo, hi, ent, ln, n_c, trunc, processed, real = reduce_floats([
            float(r.sum()), float((r**2).sum()), float(r.numel()), float(seen.zero_std_groups), float(seen.groups),
            tok, stats.sums.get("kl", 0.0), stats.sums.get("clip_low", 0.0), stats.sums.get("clip_high", 0.0),
            stats.entropy, float(lengths.sum()), float(len(lengths)), float(rollout.truncated.sum()),
            float(counter.processed), float(counter.real),
        ])
        lmin = reduce_floats([float(lengths.min()) if len(lengths) else math.inf], "min")[0]
        lmax = reduce_floats([float(lengths.max()) if len(lengths) else 0.0], "max")[0]
        mean = s / max(n, 1)
        m = {
            "reward": mean, "reward_std": math.sqrt(max(s2 - n * mean * mean, 0.0) / max(n - 1, 1)),
            "frac_reward_zero_std": zero / max(groups, 1),
            "completions/mean_length": ln / max(n_c, 1), "completions/min_length": lmin if n_c else 0.0,
            "completions/max_length": lmax, "completions/clipped_ratio": trunc / max(n_c, 1),
            "entropy": ent / max(tok, 1), "clip_ratio/low_mean": lo / max(tok, 1),
            "clip_ratio/high_mean": hi / max(tok, 1), "loss": reduce_floats([stats.loss])[0] / self.world / passes,
            "grad_norm": sum(stats.grad_norms) / max(len(stats.grad_norms), 1), "num_tokens": tok / passes,
            "tokens/processed_over_real": processed / max(real, 1),
            "step_time": dt, "generation_time": t_gen, "tokens_per_s": ln / dt,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.algorithm.cfg.beta > 0:
            m["kl"] = kl / max(tok, 1)
        for name, vals in seen.seen_per_fn.items():
            v = torch.tensor(vals, dtype=torch.float64)
            v = v[~v.isnan()]
            total, count = reduce_floats([float(v.sum()), float(v.numel())])
            m[f"rewards/{name}/mean"] = total / max(count, 1)
        if self.scorer.process_fn is not None:  # mean step reward, and the completions that got no step
            total, count, none = reduce_floats([float(sum(seen.seen_steps)), float(len(seen.seen_steps)),
                                                float(seen.no_steps)])
            m["rewards/process/mean"] = total / max(count, 1)
            m["rewards/process/frac_no_steps"] = none / max(n, 1)
        old = rollout.old_logp if rollout.old_logp is not None else stats.first_pass_logp
        if old is not None:  # the sampler's log-probs against the trainer's recomputed π_old
            gap = (old - rollout.sampler_logp).abs() * rollout.batch.completion_mask
            total, count = reduce_floats([float(gap.sum()), float(rollout.batch.completion_mask.sum())])
            m["sampling/logprob_diff/mean"] = total / max(count, 1)
            m["sampling/logprob_diff/max"] = reduce_floats([float(gap.max()) if gap.numel() else 0.0], "max")[0]
        return m



def train_rl(cfg: RLConfig, algorithm_cls) -> dict:
    """Run an RL algorithm as configured; returns the run's summary (``nanoseek.train.loop.run_loop``) with the
    first and final reward (and the best checkpoint's record with ``save_best``)."""
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

    run, trainer = start_run(narrow(RunConfig, cfg), algorithm_cls.kind, inputs)
    cfg, model = trainer.cfg, trainer.policy.model
    start = 0
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from, model, trainer.optimizer)
        start = int(state["step"])
        trainer.algorithm.load_state_dict(state)
    best = BestCheckpoint(run.dir, cfg.best_metric, run.resume_from is not None) if cfg.save_best else None
    rewards: list[float] = []

    def step(n: int, stop: StopFlag) -> tuple[dict, bool]:
        m, rollout = trainer.step(n)
        rewards.append(m["reward"])
        if is_main() and cfg.eval_every and (n % cfg.eval_every == 0 or n == cfg.steps):
            m.update(trainer.evaluate(n))
            if best is not None:
                best.update(n, m[cfg.best_metric], model, trainer.tokenizer)
        if is_main() and cfg.log_completions_every and (n - 1) % cfg.log_completions_every == 0:
            _log_completions(run.dir / "completions.jsonl", n, rollout, 4 * cfg.num_generations)
        return m, reduce_floats([float(stop.requested)], "max")[0] > 0

    config = config_dict(cfg)
    summary = run_loop(run, start, step, lambda n: save(run, n, model, trainer.optimizer, trainer.tokenizer,
                                                        {"config": config, **trainer.algorithm.state_dict()}), config)
    return {**summary, "first_reward": rewards[0] if rewards else None,
            "final_reward": rewards[-1] if rewards else None, **({"best": best.record} if best is not None else {})}


class BestCheckpoint:
    """OUT/best: the checkpoint of the step with the highest eval metric so far (ties: the earlier step), saved
    atomically with ``save_checkpoint`` (``--model OUT/best`` loads it); OUT/best/best.json records the metric,
    its value and the step. On resume the record of the interrupted run is kept."""

    def __init__(self, out: Path, metric: str, resume: bool):
        self.dir, self.metric = out / "best", metric
        path = self.dir / "best.json"
        self.record: dict | None = json.loads(path.read_text()) if resume and path.is_file() else None

    def update(self, step: int, value: float, model, tokenizer) -> None:
        """Save the model if ``value`` beats the best so far."""
        if self.record is not None and value <= self.record["value"]:
            return
        self.record = {"metric": self.metric, "value": value, "step": step}
        save_checkpoint(self.dir, step, model, state={"best": self.record}, keep=1, tokenizer=tokenizer)
        tmp = self.dir / "best.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.replace(self.dir / "best.json")


def _log_completions(path: Path, step: int, rollout: Rollout, rows: int) -> None:
    """The first ``rows`` samples of a step: prompt, completion, reward, advantage (per token under process
    supervision), gold answer."""
    G = len(rollout) // max(len(rollout.examples), 1)
    with open(path, "a") as f:
        for i in range(min(rows, len(rollout))):
            ex = rollout.examples[i // G]
            adv = rollout.advantages[i]
            adv = adv[: int(rollout.batch.completion_lens[i])].tolist() if adv.dim() else float(adv)
            f.write(json.dumps({"step": step, "prompt": ex.prompt, "completion": rollout.texts[i],
                                "reward": float(rollout.rewards[i]), "advantage": adv, "answer": ex.answer}) + "\n")
