"""``nanoseek sample``: K completions per prompt from a checkpoint, scored by reward functions, written as JSONL:
DeepSeek-R1's rejection sampling (arXiv 2501.12948 §2.3.3) and the teacher half of distillation (§2.4).

Every prompt of ``--dataset`` (or ``--num-prompts`` distinct problems of a built-in ``--task``) is sampled
``--num-samples`` times, in batches through the policy's sampler (``Policy.rollout``, the latent KV cache for
nanoseek models). Conversational prompts (and ``--system-prompt``) are rendered with the checkpoint's chat
template. Each output line holds ``prompt``, ``completion``, ``reward`` (the sum over functions), ``rewards``
(each function's value), ``truncated`` and the dataset's other columns, so the file is at once an SFT dataset
(``prompt`` + ``completion``: a string, or ``[{"role": "assistant", ...}]`` for a conversational prompt) and an
RL dataset.

``--keep correct`` keeps only verified completions: every reward function gave a value of at least
``--min-reward`` (default 1.0, the full score of the built-ins: right answer, right format, all tests pass; None,
"no verdict", never passes), and the completion ended by itself (one cut off at ``--max-new-tokens`` would teach
the student not to stop). ``--keep all`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.chat import chat_template, prompt_text
from nanoseek.datasets import PromptDataset, Row, load_prompts, task_dataset
from nanoseek.rewards import (
    RewardFn,
    check_reward_columns,
    compute_rewards,
    get_reward_fn,
    reward_name,
    trl_completions,
)


def verified(values: list[float | None], truncated: bool, min_reward: float) -> bool:
    """``--keep correct``: every reward function's value is at least ``min_reward`` and the completion ended."""
    return not truncated and all(v is not None and v >= min_reward for v in values)


def output_prompt(prompt: str | list[dict], system_prompt: str | None) -> str | list[dict]:
    """The prompt as it was rendered, for the output row: with ``--system-prompt`` a conversation starting with
    it (unless it has its own), so that the file trains on exactly what was sampled."""
    if system_prompt is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return messages if messages[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *messages]


@torch.no_grad()
def sample_dataset(policy, tokenizer, dataset: PromptDataset, reward_fns: list[RewardFn], *, num_samples: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                   seed: int = 0, batch_size: int = 64, system_prompt: str | None = None,
                   keep: str = "correct", min_reward: float = 1.0, reward_timeout_s: float | None = 60.0,
                   progress: bool = False) -> tuple[list[dict], dict]:
    """-> (output rows, summary). Rows of each prompt's ``num_samples`` completions, in dataset order, filtered
    by ``keep`` ("correct" | "all"); see the module docstring."""
    if keep not in ("correct", "all"):
        raise ValueError(f"--keep must be 'correct' or 'all', got {keep!r}")
    if keep == "correct" and not reward_fns:
        raise ValueError("--keep correct needs reward functions (--reward-funcs) to verify the completions")
    check_reward_columns(reward_fns, dataset.columns, f"dataset {dataset.name}")
    needs_template = system_prompt is not None or any(r.conversational for r in dataset.rows)
    template = chat_template(tokenizer) if needs_template else None
    texts = [prompt_text(template, r.prompt, system_prompt) for r in dataset.rows]
    rows = [(i, k) for i in range(len(dataset.rows)) for k in range(num_samples)]  # (row index, sample index)
    out: list[dict] = []
    n_kept, totals, per_fn = 0, [], {reward_name(f): [] for f in reward_fns}
    bar = tqdm(total=len(rows), desc="sample", dynamic_ncols=True, disable=not progress)
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        prompt_ids = [tokenizer.encode_prompt(texts[i]) for i, _ in chunk]
        ids = policy.rollout(prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed * 1_000_003 + b)
        src: list[Row] = [dataset.rows[i] for i, _ in chunk]
        prompts = [r.prompt for r in src]
        completions = [tokenizer.decode(c) for c in ids]
        truncated = [not (policy.eos_id is not None and c and c[-1] == policy.eos_id) for c in ids]
        result = compute_rewards(reward_fns, None, prompts, trl_completions(prompts, completions),
                                 dataset.columns_of(src), timeout_s=reward_timeout_s, completion_ids=ids)
        for j, ((_, k), row) in enumerate(zip(chunk, src)):
            values = {name: result.per_fn[name][j] for name in result.per_fn}
            totals.append(result.total[j])
            for name, v in values.items():
                per_fn[name].append(v)
            if keep == "correct" and not verified(list(values.values()), truncated[j], min_reward):
                continue
            n_kept += 1
            prompt = output_prompt(row.prompt, system_prompt)
            completion = completions[j] if isinstance(prompt, str) else \
                [{"role": "assistant", "content": completions[j]}]
            extra = {c: v for c, v in row.columns.items() if c != "example"}  # a task's Example is not JSON
            out.append({**extra, "prompt": prompt, "completion": completion, "reward": result.total[j],
                        "rewards": values, "truncated": truncated[j], "sample": k})
        bar.update(len(chunk))
    bar.close()
    summary = {"prompts": len(dataset.rows), "samples": len(rows), "kept": n_kept,
               "prompts_kept": len({json.dumps(r["prompt"], sort_keys=True) for r in out}),
               "reward_mean": sum(totals) / max(len(totals), 1),
               **{f"rewards/{n}/mean": sum(v for v in vs if v is not None) / max(sum(v is not None for v in vs), 1)
                  for n, vs in per_fn.items()}}
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="nanoseek or Hugging Face checkpoint directory (with tokenizer.json)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset name")
    src.add_argument("--task", help="a built-in task (arithmetic, countdown, gsm8k)")
    a("--dataset-config", default=None, help="the hub dataset's configuration")
    a("--dataset-split", default="train", help="the split to read (hub datasets; folders with split-named files)")
    a("--prompt-column", default="prompt", help="the column with the prompts (strings or chat messages)")
    a("--answer-column", default=None, help="the column with the gold answers, given to rewards as `answer`")
    a("--task-split", default="train", choices=["train", "eval"], help="which split of --task to sample")
    a("--num-prompts", type=int, default=None,
      help="sample the first N prompts of --dataset (default all), or N distinct problems of --task (default 256)")
    a("--num-samples", type=int, default=4, help="completions per prompt (K)")
    a("--reward-funcs", nargs="*", default=[],
      help="built-in names (math, format, format_gsm8k, code, ...) or import paths (package.module:function); "
           "with --task the task's own reward comes first")
    a("--keep", choices=["correct", "all"], default="correct",
      help="correct: only completions every reward function scores >= --min-reward that ended by themselves")
    a("--min-reward", type=float, default=1.0, help="the value each reward function must reach for --keep correct")
    a("--out", required=True, help="output .jsonl file")
    a("--max-new-tokens", type=int, default=64)
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=None)
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=64, help="sequences per sampler call")
    a("--system-prompt", default=None, help="system message for every prompt (rendered with the chat template)")
    a("--reward-timeout", type=float, default=60.0, help="seconds before a non-built-in reward function is stopped")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from nanoseek.policy import Policy
    from nanoseek.tokenizer import load_tokenizer  # nanoseek's or transformers' tokenizer, as the trainers load it

    for flag in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0: sampling K completions greedily would repeat one K times")
    fns = [get_reward_fn(n) for n in args.reward_funcs]
    if args.task is not None:
        from nanoseek.tasks import get_task, task_reward

        task = get_task(args.task)
        dataset = task_dataset(task, args.num_prompts or 256, args.task_split, seed=args.seed)
        fns = [task_reward(task), *fns]
    else:
        dataset = load_prompts(args.dataset, config=args.dataset_config, split=args.dataset_split,
                               prompt_column=args.prompt_column, answer_column=args.answer_column)
        if args.num_prompts is not None:
            dataset = PromptDataset(dataset.name, dataset.rows[: args.num_prompts], dataset.columns)
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of

    model_dir = resolve_model_dir(args.model)  # a model directory, or a run directory's latest checkpoint
    tokenizer = load_tokenizer(model_dir)
    policy = Policy.load(model_dir, tokenizer.pad_id, tokenizer.eos_id, device=device_of(args.device))
    rows, summary = sample_dataset(
        policy, tokenizer, dataset, fns, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        batch_size=args.batch_size, system_prompt=args.system_prompt, keep=args.keep, min_reward=args.min_reward,
        reward_timeout_s=args.reward_timeout, progress=sys.stderr.isatty())
    out = write_rows(args.out, rows)
    print(f"sampled {summary['samples']} completions of {summary['prompts']} prompts; kept {summary['kept']} "
          f"({summary['prompts_kept']} prompts) -> {out}")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if "reward" in k))
    if not rows:
        print(f"nanoseek sample: warning: no completion was kept; {out} is empty", file=sys.stderr)
    return 0
