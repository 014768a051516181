"""``nanoseek sample``: K completions per prompt from a checkpoint, scored by reward functions, written as JSONL:
DeepSeek-R1's rejection sampling (arXiv 2501.12948 §2.3.3) and the teacher half of distillation (§2.4).

Each output line holds ``prompt``, ``completion`` (a string, or an assistant message after a conversational prompt),
``reward`` (the sum over functions), ``rewards`` (each function's value), ``truncated`` and the dataset's other
columns: at once an SFT and an RL dataset. ``--keep correct`` keeps only verified completions (``Scored.verified``:
each function gave >= ``--min-reward`` and it ended by itself; a cut-off one would teach the student not to stop)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import check_ranges, from_args, option
from nanoseek.datasets import PromptDataset, load_prompts, task_dataset
from nanoseek.hf import atomic_write
from nanoseek.policy import SamplingParams
from nanoseek.rewards import RewardFlags, RewardFn, check_computed, check_reward_columns, get_reward_fn
from nanoseek.rollout import Scorer, sample_and_score
from nanoseek.tasks import get_task, task_reward


def sample_dataset(policy, tokenizer, dataset: PromptDataset, reward_fns: list[RewardFn], *, num_generations: int,
                   max_completion_length: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int | None = None, seed: int = 0, batch_size: int = 64, system_prompt: str | None = None,
                   keep: str = "correct", min_reward: float = 1.0, reward_timeout_s: float | None = 60.0,
                   progress: bool = False) -> tuple[list[dict], dict]:
    """-> (output rows, summary): each prompt's ``num_generations`` completions, in order, filtered by ``keep``."""
    if keep == "correct" and not reward_fns:
        raise ValueError("--keep correct needs reward functions (--reward-funcs) to verify the completions")
    check_reward_columns(reward_fns, dataset.columns, f"dataset {dataset.name}")
    scorer = Scorer(reward_fns, tokenizer=tokenizer, timeout_s=reward_timeout_s, columns=dataset.columns)
    rows = [r for r in dataset.rows for _ in range(num_generations)]
    params = SamplingParams(max_tokens=max_completion_length, temperature=temperature, top_k=top_k, top_p=top_p)
    scored = sample_and_score(policy, lambda p: tokenizer.encode_prompt(p, system_prompt), tokenizer.decode, rows,
                              scorer, params, seed * 1_000_003, batch_size=batch_size,
                              desc="sample" if progress else None)
    result, ok = scored.result, scored.verified(scorer.names, min_reward)
    out: list[dict] = []
    for j, row in enumerate(rows):
        if keep == "correct" and not ok[j]:
            continue
        prompt = row.prompt
        if system_prompt is not None:  # the prompt as rendered, so that the file trains on exactly what was sampled
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            prompt = prompt if prompt[0]["role"] == "system" else [dict(role="system", content=system_prompt), *prompt]
        completion = scored.texts[j] if isinstance(prompt, str) else [{"role": "assistant", "content": scored.texts[j]}]
        extra = {c: v for c, v in row.columns.items() if c != "example"}  # a task's Example is not JSON
        out.append({**extra, "prompt": prompt, "completion": completion, "reward": result.total[j],
                    "rewards": {name: values[j] for name, values in result.per_fn.items()},
                    "truncated": scored.samples.truncated[j], "sample": j % num_generations})
    return out, {"prompts": len(dataset.rows), "samples": len(rows), "kept": len(out),
                 "prompts_kept": len({json.dumps(r["prompt"], sort_keys=True) for r in out}), **result.metrics()}


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """The rows as JSON lines, written atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return out


# ---------------------------------------------------------------------- CLI
@dataclass(frozen=True, kw_only=True)
class PromptsConfig(RewardFlags):
    """``nanoseek sample`` and ``nanoseek eval``: the checkpoint, its prompts (a task or a dataset) and verifiers."""

    model: str = option(help="nanoseek or Hugging Face checkpoint directory (with tokenizer.json), or a run "
                        "directory (its latest checkpoint)")
    task: str | None = option(None, "a built-in task (arithmetic, countdown, gsm8k)")
    dataset: str | None = option(None, "a local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str | None = option("train", "the split to read (hub datasets; folders of split-named files)")
    prompt_column: str = option("prompt", "the column with the prompts (strings or chat messages)")
    answer_column: str | None = option(None, "the column with the gold answers, given to rewards as `answer`")
    system_prompt: str | None = option(None, "system message for every prompt (rendered with the chat template)")
    reward_funcs: list[str] = option(help="built-in names (math, format, format_gsm8k, code, ...) or import paths "
                                     "(package.module:function); with --task the task's own reward comes first",
                                     default_factory=list)
    min_reward: float = option(1.0, "the value each reward function must reach to verify a completion")
    seed: int = option(0, "sampling seed (and --task's problems)")
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")


def load_prompts_of(cfg: PromptsConfig, n: int | None, task_split: str) -> tuple[PromptDataset, list[RewardFn]]:
    """The first ``n`` prompts of ``--dataset`` (None: all), or ``n`` distinct problems of ``--task``'s
    ``task_split``; with the reward functions (the task's own first, then ``--reward-funcs``)."""
    if (cfg.dataset is None) == (cfg.task is None):
        raise ValueError("give one of --dataset or --task")
    fns = [get_reward_fn(name) for name in cfg.reward_funcs]
    if cfg.task is not None:
        task = get_task(cfg.task)
        return task_dataset(task, n, task_split, seed=cfg.seed), cfg.guard([task_reward(task), *fns])
    split = cfg.dataset_split or ("train" if Path(cfg.dataset).expanduser().is_file() else "test")
    ds = load_prompts(cfg.dataset, config=cfg.dataset_config, split=split, prompt_column=cfg.prompt_column,
                      answer_column=cfg.answer_column)
    return PromptDataset(ds.name, ds.rows[:n], ds.columns), cfg.guard(fns)


@dataclass(frozen=True, kw_only=True)
class SampleConfig(PromptsConfig):
    """``nanoseek sample``: what to sample from, how, and which completions to keep."""

    out: str = option(help="output .jsonl file")
    task_split: str = option("train", "which split of --task to sample", choices=("train", "eval"))
    num_prompts: int | None = option(None, "sample the first N prompts of --dataset (default all), or N distinct "
                                     "problems of --task (default 256)", min=1)
    num_generations: int = option(4, "completions per prompt (K)", min=1)
    keep: str = option("correct", "correct: only completions every reward function scores >= --min-reward that "
                       "ended by themselves", choices=("correct", "all"))
    max_completion_length: int = option(64, "tokens generated per completion, at most", min=1)
    temperature: float = option(1.0, "sampling temperature (K greedy samples would repeat one K times)", gt=0)
    top_p: float = option(1.0, "nucleus sampling", gt=0, max=1)
    top_k: int | None = option(None, "sample among the k most likely tokens", min=1)
    batch_size: int = option(64, "sequences per sampler call", min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, SampleConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of
    from nanoseek.policy import Policy
    from nanoseek.tokenizer import Tokenizer

    cfg = from_args(SampleConfig, args)
    check_ranges(cfg)
    dataset, fns = load_prompts_of(cfg, cfg.num_prompts or (256 if cfg.task else None), cfg.task_split)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = Tokenizer.load(model_dir)
    policy = Policy.load(model_dir, tokenizer.pad_id, tokenizer.eos_id, device=device_of(cfg.device))
    rows, summary = sample_dataset(
        policy, tokenizer, dataset, fns, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.batch_size, system_prompt=cfg.system_prompt, keep=cfg.keep,
        min_reward=cfg.min_reward, reward_timeout_s=cfg.reward_timeout_s, progress=sys.stderr.isatty())
    check_computed(fns)
    out = write_rows(cfg.out, rows)
    print(f"sampled {summary['samples']} completions of {summary['prompts']} prompts; kept {summary['kept']} "
          f"({summary['prompts_kept']} prompts) -> {out}")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if "reward" in k))
    if not rows:
        print(f"nanoseek sample: warning: no completion was kept; {out} is empty", file=sys.stderr)
    return 0
