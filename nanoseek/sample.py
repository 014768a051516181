"""``nanoseek sample``: K completions per prompt from a checkpoint, scored by reward functions, written as JSONL:
DeepSeek-R1's rejection sampling (arXiv 2501.12948 §2.3.3) and the teacher half of distillation (§2.4).

Every prompt of ``--dataset`` (or ``--num-prompts`` distinct problems of a built-in ``--task``) is sampled
``--num-generations`` times, in batches through the policy's sampler (``nanoseek.rollout.sample_and_score``;
the latent KV cache for nanoseek models). Conversational prompts (and ``--system-prompt``) are rendered with the
checkpoint's chat template. Each output line holds ``prompt``, ``completion``, ``reward`` (the sum over functions),
``rewards`` (each function's value), ``truncated`` and the dataset's other columns, so the file is at once an SFT
dataset (``prompt`` + ``completion``: a string, or ``[{"role": "assistant", ...}]`` for a conversational prompt) and
an RL dataset.

``--keep correct`` keeps only verified completions: every reward function gave a value of at least ``--min-reward``
(default 1.0, the full score of the built-ins: right answer, right format, all tests pass; None, "no verdict", never
passes), and the completion ended by itself (one cut off at ``--max-completion-length`` would teach the student not
to stop). ``--keep all`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import check_ranges, from_args, option
from nanoseek.datasets import PromptDataset, load_prompts, task_dataset
from nanoseek.policy import SamplingParams
from nanoseek.rewards import RewardFn, check_reward_columns, get_reward_fn
from nanoseek.rollout import Scorer, sample_and_score


def output_prompt(prompt: str | list[dict], system_prompt: str | None) -> str | list[dict]:
    """The prompt as it was rendered, for the output row: with ``--system-prompt`` a conversation starting with
    it (unless it has its own), so that the file trains on exactly what was sampled."""
    if system_prompt is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return messages if messages[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *messages]


def sample_dataset(policy, tokenizer, dataset: PromptDataset, reward_fns: list[RewardFn], *, num_generations: int,
                   max_completion_length: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int | None = None, seed: int = 0, batch_size: int = 64, system_prompt: str | None = None,
                   keep: str = "correct", min_reward: float = 1.0, reward_timeout_s: float | None = 60.0,
                   progress: bool = False) -> tuple[list[dict], dict]:
    """-> (output rows, summary). Rows of each prompt's ``num_generations`` completions, in dataset order, filtered
    by ``keep`` ("correct" | "all"); see the module docstring."""
    if keep == "correct" and not reward_fns:
        raise ValueError("--keep correct needs reward functions (--reward-funcs) to verify the completions")
    check_reward_columns(reward_fns, dataset.columns, f"dataset {dataset.name}")
    scorer = Scorer(reward_fns, [1.0] * len(reward_fns), tokenizer, timeout_s=reward_timeout_s,
                    columns=dataset.columns)
    rows = [r for r in dataset.rows for _ in range(num_generations)]
    scored = sample_and_score(
        policy, lambda p: tokenizer.encode_prompt(p, system_prompt),
        tokenizer.decode, rows, scorer, SamplingParams(max_tokens=max_completion_length, temperature=temperature,
                                                       top_k=top_k, top_p=top_p),
        seed * 1_000_003, batch_size=batch_size, desc="sample" if progress else None)
    result, truncated = scored.result, scored.samples.truncated
    ok = scored.verified(scorer.names, min_reward)
    out: list[dict] = []
    for j, row in enumerate(rows):
        if keep == "correct" and not ok[j]:
            continue
        prompt = output_prompt(row.prompt, system_prompt)
        completion = scored.texts[j] if isinstance(prompt, str) else [{"role": "assistant", "content": scored.texts[j]}]
        extra = {c: v for c, v in row.columns.items() if c != "example"}  # a task's Example is not JSON
        out.append({**extra, "prompt": prompt, "completion": completion, "reward": result.total[j],
                    "rewards": {name: values[j] for name, values in result.per_fn.items()},
                    "truncated": truncated[j], "sample": j % num_generations})
    summary = {"prompts": len(dataset.rows), "samples": len(rows), "kept": len(out),
               "prompts_kept": len({json.dumps(r["prompt"], sort_keys=True) for r in out}), **result.metrics()}
    return out, summary


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """The rows as JSON lines, written atomically (a temporary file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------- CLI
@dataclass
class SampleConfig:
    """``nanoseek sample``: what to sample from, how, and which completions to keep."""

    model: str = option(help="nanoseek or Hugging Face checkpoint directory (with tokenizer.json), or a run "
                        "directory (its latest checkpoint)")
    out: str = option(help="output .jsonl file")
    dataset: str | None = option(None, "local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset name "
                                 "(give --dataset or --task)")
    task: str | None = option(None, "a built-in task (arithmetic, countdown, gsm8k)")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str = option("train", "the split to read (hub datasets; folders with split-named files)")
    prompt_column: str = option("prompt", "the column with the prompts (strings or chat messages)")
    answer_column: str | None = option(None, "the column with the gold answers, given to rewards as `answer`")
    task_split: str = option("train", "which split of --task to sample", choices=("train", "eval"))
    num_prompts: int | None = option(None, "sample the first N prompts of --dataset (default all), or N distinct "
                                     "problems of --task (default 256)", min=1)
    num_generations: int = option(4, "completions per prompt (K)", min=1)
    reward_funcs: list[str] = option(help="built-in names (math, format, format_gsm8k, code, ...) or import paths "
                                     "(package.module:function); with --task the task's own reward comes first",
                                     default_factory=list)
    keep: str = option("correct", "correct: only completions every reward function scores >= --min-reward that "
                       "ended by themselves", choices=("correct", "all"))
    min_reward: float = option(1.0, "the value each reward function must reach for --keep correct")
    max_completion_length: int = option(64, "tokens generated per completion, at most", min=1)
    temperature: float = option(1.0, "sampling temperature (K greedy samples would repeat one K times)", gt=0)
    top_p: float = option(1.0, "nucleus sampling", gt=0, max=1)
    top_k: int | None = option(None, "sample among the k most likely tokens", min=1)
    seed: int = option(0, "sampling seed (and --task's problems)")
    batch_size: int = option(64, "sequences per sampler call", min=1)
    system_prompt: str | None = option(None, "system message for every prompt (rendered with the chat template)")
    reward_timeout_s: float = option(60.0, "seconds before a non-built-in reward function is stopped", gt=0)
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, SampleConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of
    from nanoseek.policy import Policy
    from nanoseek.tokenizer import Tokenizer

    cfg = from_args(SampleConfig, args)
    check_ranges(cfg)
    if (cfg.dataset is None) == (cfg.task is None):
        raise ValueError("give one of --dataset or --task")
    fns = [get_reward_fn(n) for n in cfg.reward_funcs]
    if cfg.task is not None:
        from nanoseek.tasks import get_task, task_reward

        task = get_task(cfg.task)
        dataset = task_dataset(task, cfg.num_prompts or 256, cfg.task_split, seed=cfg.seed)
        fns = [task_reward(task), *fns]
    else:
        dataset = load_prompts(cfg.dataset, config=cfg.dataset_config, split=cfg.dataset_split,
                               prompt_column=cfg.prompt_column, answer_column=cfg.answer_column)
        if cfg.num_prompts is not None:
            dataset = PromptDataset(dataset.name, dataset.rows[: cfg.num_prompts], dataset.columns)
    model_dir = resolve_model_dir(cfg.model)  # a model directory, or a run directory's latest checkpoint
    tokenizer = Tokenizer.load(model_dir)
    policy = Policy.load(model_dir, tokenizer.pad_id, tokenizer.eos_id, device=device_of(cfg.device))
    rows, summary = sample_dataset(
        policy, tokenizer, dataset, fns, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.batch_size, system_prompt=cfg.system_prompt, keep=cfg.keep,
        min_reward=cfg.min_reward, reward_timeout_s=cfg.reward_timeout_s, progress=sys.stderr.isatty())
    out = write_rows(cfg.out, rows)
    print(f"sampled {summary['samples']} completions of {summary['prompts']} prompts; kept {summary['kept']} "
          f"({summary['prompts_kept']} prompts) -> {out}")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if "reward" in k))
    if not rows:
        print(f"nanoseek sample: warning: no completion was kept; {out} is empty", file=sys.stderr)
    return 0
