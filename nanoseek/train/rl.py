"""The RL run shared by GRPO and PPO: one step is ``collect -> algorithm.prepare -> optimize``, and ``train_rl``
wraps steps in a run (checkpoints, exact resume, metrics, Ctrl-C).

An algorithm (``Algorithm``: GRPO in grpo.py, PPO in ppo.py) supplies only what differs: how a rollout gets its
advantages and old / reference log-probs (``prepare``), the loss of one micro-batch (``loss``), any extra trainable
module (PPO's critic) and its checkpoint state. Steps count from 1 everywhere (metrics, checkpoints, the bar).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from nanoseek.datasets import Row
from nanoseek.distributed import init_distributed, reduce_floats
from nanoseek.policy import Policy, SamplingParams
from nanoseek.cli_args import check_ranges, option
from nanoseek.train.optimize import OptimizeConfig, OptimizeStats, TokenCounter, Trainable, optimize
from nanoseek.train.rl_data import rl_data
from nanoseek.train.rollout import CollectStats, Rollout, Scorer, collect
from nanoseek.train.schedule import lr_at


@dataclass
class RLConfig:
    """What every RL algorithm shares: model, data, sampling, optimisation, run directory."""

    model: str = option(help="nanoseek or Hugging Face checkpoint directory with tokenizer.json, or a run directory")
    out: str = option("runs/rl", "run directory: metrics.jsonl, completions.jsonl, checkpoints/")
    task: str = option("arithmetic", "built-in task giving prompts and the task reward (unless --dataset)")
    task_kwargs: dict = option(default_factory=dict, help='task options as JSON, e.g. \'{"max_operand": 9}\'')
    dataset: str | None = option(None, "prompts from a local .jsonl/.json/.parquet/.csv file or folder, or a hub "
                                 "dataset, instead of --task (rewards: --reward-funcs only)")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str = option("train", "the split to read (hub datasets; folders of split-named files)")
    prompt_column: str = option("prompt", "the column with the prompts (strings or chat messages)")
    answer_column: str | None = option(None, "the column with the gold answers, given to rewards as `answer`")
    completion_column: str = option("completion", "the column with reference completions (SFT-style rows)")
    messages_column: str = option("messages", "the column with whole conversations (prompt = all but the reply)")
    system_prompt: str | None = option(None, "system message for every prompt (rendered with the chat template)")
    reward_funcs: list[str] = option(default_factory=list,
                                     help="reward functions: built-in names (math, format, format_gsm8k, equations, "
                                     "countdown, code) or import paths (package.module:function)")
    reward_weights: list[float] = option(default_factory=list,
                                         help="weights: the task reward first (without --dataset), then each of "
                                         "--reward-funcs (default all 1)")
    eval_every: int = option(0, "evaluate on held-out prompts every N steps and at the end (0: never)", min=0)
    eval_dataset: str | None = option(None, "held-out prompts for --eval-every (default: the task's held-out "
                                      "split, or one in 10 of --dataset's prompts, held out of training)")
    eval_split: str | None = option(None, "--eval-dataset's split (default: train for a file, else test)")
    eval_n: int = option(200, "most held-out prompts evaluated", min=1)
    eval_k: int = option(4, "samples per held-out prompt for pass@k (0: greedy only)", min=0)
    save_best: str | None = option(None, "keep the best checkpoint by this eval metric in OUT/best (accuracy, "
                                   "pass@k, sample_accuracy, reward)",
                                   choices=("accuracy", "pass@k", "sample_accuracy", "reward"))
    num_generations: int = option(8, "G completions per prompt", min=1)
    prompts_per_step: int = option(8, "P prompts per step (global: split over ranks)", min=1)
    max_completion_length: int = option(16, "most tokens per completion", min=1)
    steps: int = option(100, "RL steps (one rollout each)", min=1)
    lr: float = option(1e-5, "policy learning rate", gt=0)
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    lr_schedule: str = option("constant", "after warm-up: constant, or a linear / cosine decay to 0 at the last step",
                              choices=("constant", "linear", "cosine"))
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", gt=0)
    beta: float = option(0.0, "KL coefficient β (> 0 keeps a frozen reference model)", min=0)
    num_iterations: int = option(1, "μ passes over each rollout", min=1)
    num_minibatches: int = option(1, "optimizer steps per pass", min=1)
    micro_batch_size: int = option(0, "most rows per forward/backward (0: only the padding rule splits)", min=0)
    temperature: float = option(1.0, "sampling temperature", gt=0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, max=1)
    top_k: int | None = option(None, "sample from the k most likely tokens only", min=1)
    epsilon: float = option(0.2, "clip range ε (ε_low)", gt=0)
    epsilon_high: float | None = option(None, "clip-higher ε_high (default ε)", gt=0)
    share_prompts: bool = option(True, "run a group's shared prompt once in the log-prob passes (exact)")
    reward_timeout_s: float | None = option(None, "run non-built-in reward functions in a killable worker", gt=0)
    logp_chunk_tokens: int = option(1024, "completion tokens per vocabulary-head matmul", min=1)
    log_completions_every: int = option(10, "write samples to completions.jsonl every N steps (0: never)", min=0)
    save_every: int = option(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)", min=0)
    keep: int = option(2, "checkpoints kept", min=1)
    seed: int = option(0, "seed of prompts, sampling and shuffling")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    resume: bool = option(False, "continue exactly from OUT's latest checkpoint (a new run if --out is empty)")
    overwrite: bool = option(False, "delete what --out holds and start over")
    progress: bool = option(True, "show a progress bar")

    def process_reward_fn(self) -> Callable | None:
        """Per-step rewards for process supervision (GRPO's ``--process-reward``); None: outcome rewards only."""
        return None

    def resampling(self) -> tuple[bool, int]:
        """(keep only groups whose rewards differ, most extra sampling rounds): DAPO's dynamic sampling (GRPO's)."""
        return False, 0

    def validate(self) -> None:
        check_ranges(self)
        n_fns = (0 if self.dataset else 1) + len(self.reward_funcs)
        if self.dataset and not self.reward_funcs:
            raise ValueError("--dataset: give the reward functions with --reward-funcs (e.g. math, or "
                             "package.module:function); a dataset has no task reward")
        if self.reward_weights and len(self.reward_weights) != n_fns:
            raise ValueError(f"--reward-weights: {len(self.reward_weights)} given, need {n_fns} ("
                             f"{'' if self.dataset else 'the task reward, then '}each of --reward-funcs)")
        if self.save_best and not self.eval_every:
            raise ValueError("--save-best needs --eval-every N (the best checkpoint is chosen by the evaluations)")
        if self.save_best in ("pass@k", "sample_accuracy") and not self.eval_k:
            raise ValueError(f"--save-best {self.save_best} needs --eval-k > 0 (samples per held-out prompt)")

    @property
    def best_metric(self) -> str:
        """The metrics.jsonl key ``--save-best`` compares (``eval/pass@4`` for pass@k with --eval-k 4)."""
        return "eval/" + (self.save_best or "").replace("pass@k", f"pass@{self.eval_k}")

    def to_dict(self) -> dict:
        return asdict(self)

    def optimize_config(self) -> OptimizeConfig:
        return OptimizeConfig(self.num_iterations, self.num_minibatches, self.micro_batch_size, self.temperature,
                              self.logp_chunk_tokens)


class Algorithm(Protocol):
    """What GRPO and PPO each add to the shared step."""

    kind: str

    def prepare(self, rollout: Rollout, step: int, counter: TokenCounter) -> Rollout:
        """Attach advantages (and old / reference log-probs, values...) to a collected rollout."""

    def loss(self, rollout: Rollout, mb, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch (normalised by its mini-batch) and its statistics (sums)."""

    def trainables(self) -> list[Trainable]:
        """Modules trained besides the policy (PPO's critic)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def metrics(self, rollout: Rollout, stats: OptimizeStats) -> dict[str, float]: ...


class RLTrainer:
    """The policy, its optimizer, the reward functions and one algorithm; ``step(n)`` runs RL step n (1-based)."""

    def __init__(self, cfg: RLConfig, policy: Policy, tokenizer, algorithm_cls, rank: int = 0, world: int = 1):
        cfg.validate()
        self.cfg, self.policy, self.tokenizer, self.rank, self.world = cfg, policy, tokenizer, rank, world
        self.data = rl_data(cfg, tokenizer)
        fns = self.data.reward_fns
        self.scorer = Scorer(fns, cfg.reward_weights or [1.0] * len(fns), tokenizer, cfg.process_reward_fn(),
                             cfg.reward_timeout_s, self.data.columns)
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.algorithm: Algorithm = algorithm_cls(cfg, policy, world)

    # -------------------------------------------------------------- data
    def prompts(self, step: int, round_: int = 0) -> list[Row]:
        """This rank's share of step ``step``'s P prompts (deterministic in seed, step and round: exact on resume)."""
        P = self.cfg.prompts_per_step
        rows = self.data.train.batch(step - 1, P, seed=self.cfg.seed, round_=round_)
        return rows[self.rank * P // self.world : (self.rank + 1) * P // self.world]

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return self.data.encode(self.tokenizer, prompt)

    def evaluate(self, step: int) -> dict[str, float]:
        """``eval/...`` metrics on the held-out prompts (``nanoseek.evaluate.evaluate_prompts``)."""
        from nanoseek.evaluate import evaluate_prompts
        from nanoseek.rewards import reward_name

        cfg = self.cfg
        held_out = self.data.held_out  # its own columns: an --eval-dataset's may differ from the training prompts'
        m = evaluate_prompts(self.policy, self.encode, self.tokenizer.decode, list(held_out.rows),
                             replace(self.scorer, columns=held_out.columns),
                             [reward_name(f) for f in self.data.correct], k=cfg.eval_k,
                             temperature=cfg.temperature, max_new_tokens=cfg.max_completion_length, seed=cfg.seed)
        return {f"eval/{k}": v for k, v in m.items()}

    def collect(self, step: int) -> tuple[Rollout, CollectStats]:
        cfg = self.cfg
        base = (cfg.seed * 1_000_003 + step - 1) * 101
        informative_only, max_rounds = cfg.resampling()
        return collect(
            self.policy, self.encode, self.tokenizer.decode, lambda r: self.prompts(step, r), self.scorer,
            num_generations=cfg.num_generations,
            params=SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p),
            seed=lambda r: (base + r) * 64 + self.rank, informative_only=informative_only,
            max_resample_rounds=max_rounds,
        )

    # -------------------------------------------------------------- one step
    def step(self, step: int) -> tuple[dict, Rollout]:
        """RL step ``step`` (1-based): sample and score, prepare, optimize. Returns (metrics, the rollout)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step - 1, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        rollout, seen = self.collect(step)
        t_gen = time.perf_counter() - t0
        counter = TokenCounter()
        rollout = self.algorithm.prepare(rollout, step, counter)
        trainables = [Trainable(self.policy.model, self.optimizer, cfg.max_grad_norm)] + self.algorithm.trainables()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step - 1)
        stats = optimize(self.policy, rollout, self.algorithm.loss, trainables, cfg.optimize_config(), gen, counter)
        m = self.metrics(step, rollout, seen, stats, counter, time.perf_counter() - t0, t_gen)
        return {**m, **self.algorithm.metrics(rollout, stats)}, rollout

    def metrics(self, step: int, rollout: Rollout, seen: CollectStats, stats: OptimizeStats, counter: TokenCounter,
                dt: float, t_gen: float) -> dict:
        """TRL's metric names where TRL has the quantity; sums gathered over ranks."""
        cfg, passes = self.cfg, self.cfg.num_iterations
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
        if cfg.beta > 0:
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

    # -------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        return self.algorithm.state_dict()

    def load_checkpoint_state(self, state: dict) -> None:
        self.algorithm.load_state_dict(state)


def train_rl(cfg: RLConfig, algorithm_cls) -> dict:
    """Run an RL algorithm as configured; returns a summary (steps, first/final reward, wall time, run dir,
    whether Ctrl-C stopped it). Checkpoints every ``save_every`` steps, on Ctrl-C and at the end; ``resume``
    continues exactly from the latest."""
    from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, resolve_model_dir, save_checkpoint
    from nanoseek.metrics import MetricsLogger
    from nanoseek.rundir import check_run_dir
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.interrupt import StopFlag

    cfg.validate()
    kind = algorithm_cls.kind
    run_plan = check_run_dir(cfg.out, kind, resume=cfg.resume, overwrite=cfg.overwrite)
    cfg = replace(cfg, model=str(resolve_model_dir(cfg.model)))
    rank, world, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.model)
    policy = Policy.load(cfg.model, tokenizer.pad_id, tokenizer.eos_id, device=device)
    policy.share_prompts = cfg.share_prompts
    trainer = RLTrainer(cfg, policy, tokenizer, algorithm_cls, rank, world)
    out = run_plan.create()  # inputs are checked: now claim (or clear) the run directory
    start = 0
    if run_plan.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt, policy.model, trainer.optimizer)
        start = int(state["step"])
        trainer.load_checkpoint_state(state)
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kind}_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    logger = MetricsLogger(out, cfg.steps, kind, enabled=main, start_step=start, progress=cfg.progress)
    first = last = None
    best = BestCheckpoint(out, cfg.best_metric, run_plan.resume) if cfg.save_best else None
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if main:
            state = {"step": step, "config": cfg.to_dict(), **trainer.checkpoint_state()}
            save_checkpoint(out, step, policy.model, trainer.optimizer, state, keep=cfg.keep, tokenizer=tokenizer)

    done, stopped = start, False
    with StopFlag() as stop:
        for step in range(start + 1, cfg.steps + 1):
            m, rollout = trainer.step(step)
            done = step
            first = m["reward"] if first is None else first
            last = m["reward"]
            if main and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                m.update(trainer.evaluate(step))
                if best is not None:
                    best.update(step, m[cfg.best_metric], policy.model, tokenizer)
            if main:
                logger.log(step, **m)
                if cfg.log_completions_every and (step - 1) % cfg.log_completions_every == 0:
                    _log_completions(out / "completions.jsonl", step, rollout, 4 * cfg.num_generations)
            stopped = reduce_floats([float(stop.requested)], "max")[0] > 0
            if stopped:
                if main:
                    print(f"interrupted: saving step {done}; continue with --resume", file=sys.stderr)
                break
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
    if done > start:
        save(done)
    logger.close()
    return {"steps": done, "first_reward": first, "final_reward": last, "wall_time": time.perf_counter() - t0,
            "run_dir": str(out), "interrupted": stopped, **({"best": best.record} if best is not None else {})}


class BestCheckpoint:
    """OUT/best: the checkpoint of the step with the highest eval metric so far (ties: the earlier step), saved
    atomically with ``save_checkpoint`` (``--model OUT/best`` loads it); OUT/best/best.json records the metric,
    its value and the step. On resume the record of the interrupted run is kept."""

    def __init__(self, out: Path, metric: str, resume: bool):
        self.dir, self.metric = out / "best", metric
        path = self.dir / "best.json"
        self.record: dict | None = json.loads(path.read_text()) if resume and path.is_file() else None

    def update(self, step: int, value: float, model, tokenizer) -> bool:
        """Save the model if ``value`` beats the best so far; returns whether it did."""
        from nanoseek.checkpoint import save_checkpoint

        if self.record is not None and value <= self.record["value"]:
            return False
        self.record = {"metric": self.metric, "value": value, "step": step}
        save_checkpoint(self.dir, step, model, state={"best": self.record}, keep=1, tokenizer=tokenizer)
        tmp = self.dir / "best.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.replace(self.dir / "best.json")
        return True


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
