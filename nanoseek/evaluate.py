"""Held-out evaluation: greedy accuracy, maj@k and pass@k of a policy on dataset prompts.

One evaluator for every caller (``nanoseek eval``, the recipes, GRPO/PPO's ``--eval-every``): each prompt is
completed greedily once and sampled k times at temperature τ through ``nanoseek.rollout.sample_and_score``;
a completion is correct when every function named in ``correct`` gives at least ``min_reward`` and it ended by
itself. A built-in task is a dataset too (``nanoseek.datasets.task_dataset``), verified by the task's reward.
- ``accuracy``: the greedy completion is correct;
- ``pass@k``: at least one of the k samples is correct (the unbiased estimator of Chen et al. 2021 with n = k);
- ``maj@k``: the most frequent of the k sampled final answers (ties: the earliest) is correct;
- ``sample_accuracy``: the fraction of the k samples that are correct (pass@1 at temperature τ).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import check_ranges, from_args, option
from nanoseek.datasets import Row
from nanoseek.policy import SamplingParams
from nanoseek.rewards.math import extract_final_answer
from nanoseek.rollout import Scorer, sample_and_score

if TYPE_CHECKING:
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import Tokenizer

SCALARS = ("accuracy", "reward", "mean_length", "sample_accuracy")


def vote_key(text: str) -> str:
    """The answer a sample votes for in maj@k: its extracted final answer (``#### 42``, ``\\boxed{42}``,
    ``<answer>42</answer>``: ``nanoseek.rewards.math.extract_final_answer``), else its first line, without
    surrounding spaces; so two worked solutions that reach the same number vote together."""
    final = extract_final_answer(text)
    return final.strip() if final is not None else text.strip().split("\n", 1)[0].strip()


def evaluate(policy, encode: Callable[[str | list[dict]], list[int]], decode: Callable[[list[int]], str],
             rows: list[Row], scorer: Scorer, correct: list[str], *, k: int = 8, temperature: float = 1.0,
             max_completion_length: int = 16, batch_size: int = 512, seed: int = 0, min_reward: float = 1.0,
             progress: bool = False) -> dict:
    """Greedy ``accuracy``, ``reward`` (mean weighted reward of the greedy completions), ``mean_length`` (greedy
    completion tokens) and, with k > 0, ``pass@k``, ``maj@k`` and ``sample_accuracy`` over ``rows`` (fractions
    0–1); with the per-problem ``greedy_correct`` / ``sample_correct`` (for paired comparisons of two checkpoints)
    and the first 20 greedy completions."""
    if not rows:
        raise ValueError("evaluate: no examples given")
    if k < 0 or (k and temperature <= 0):
        raise ValueError(f"evaluate: need k >= 0 and temperature > 0 for the k samples (got k={k}, "
                         f"temperature={temperature})")
    was_training = policy.model.training
    policy.model.eval()

    def run(rows_: list[Row], temp: float, seed_: int, desc: str):
        scored = sample_and_score(policy, encode, decode, rows_, scorer,
                                  SamplingParams(max_tokens=max_completion_length, temperature=temp),
                                  seed_ * 100_003, batch_size=batch_size, desc=desc if progress else None)
        return scored, [float(ok) for ok in scored.verified(correct, min_reward)]

    greedy, ok = run(list(rows), 0.0, seed, "eval greedy")
    n = len(rows)
    out = {"n": n, "accuracy": sum(ok) / n, "reward": sum(greedy.result.total) / n,
           "mean_length": sum(map(len, greedy.samples.completions)) / n, "greedy_correct": ok}
    if k:
        sampled, ok_k = run([r for r in rows for _ in range(k)], temperature, seed + 1, f"eval {k} samples")
        per_problem, majority = [], 0.0
        for i in range(n):
            scores, texts = ok_k[i * k : (i + 1) * k], sampled.texts[i * k : (i + 1) * k]
            per_problem.append(sum(scores) / k)
            votes = Counter(map(vote_key, texts))
            top = max(votes.values())
            majority += scores[next(j for j, t in enumerate(texts) if votes[vote_key(t)] == top)]
        out.update({f"pass@{k}": sum(p > 0 for p in per_problem) / n, f"maj@{k}": majority / n,
                    "sample_accuracy": sum(per_problem) / n, "sample_correct": per_problem, "k": k,
                    "temperature": temperature})
    out["greedy_completions"] = [{"prompt": r.prompt, "completion": t, "correct": c}
                                 for r, t, c in list(zip(rows, greedy.texts, ok))[:20]]
    policy.model.train(was_training)
    return out


def evaluate_prompts(policy, encode, decode, rows: list[Row], scorer: Scorer, correct: list[str], *, k: int = 4,
                     temperature: float = 1.0, max_completion_length: int = 16, batch_size: int = 512, seed: int = 0,
                     min_reward: float = 1.0) -> dict[str, float]:
    """The scalar metrics of ``evaluate`` (what ``--eval-every`` logs): accuracy, reward, mean_length and, with
    k > 0, pass@k, maj@k and sample_accuracy."""
    r = evaluate(policy, encode, decode, rows, scorer, correct, k=k, temperature=temperature,
                 max_completion_length=max_completion_length, batch_size=batch_size, seed=seed, min_reward=min_reward)
    return {key: r[key] for key in (*SCALARS, f"pass@{k}", f"maj@{k}") if key in r}


def evaluate_task(policy, tokenizer, task, rows: list[Row], **kwargs) -> dict:
    """``evaluate`` on rows of a built-in task (``nanoseek.datasets.task_dataset``), verified by the task's
    reward (``task.score``); prompts are encoded as the trainers encode them."""
    from nanoseek.rewards import reward_name
    from nanoseek.tasks import task_reward

    fn = task_reward(task)
    return evaluate(policy, tokenizer.encode_prompt, tokenizer.decode, rows,
                    Scorer([fn], [1.0], tokenizer), [reward_name(fn)], **kwargs)


# ---------------------------------------------------------------------- CLI
@dataclass
class EvalConfig:
    """``nanoseek eval``: the checkpoint, the held-out prompts (a built-in task, or a dataset with the reward
    functions that verify a completion) and the sampling of the k samples."""

    model: str = option(help="nanoseek checkpoint directory (config.json, model.safetensors, tokenizer.json), or a "
                        "run directory (its latest checkpoint)")
    task: str | None = option(None, "built-in task (None: the task the checkpoint's run trained on)")
    n: int = option(1000, "distinct held-out problems (fewer when the held-out split is smaller)", min=1)
    num_generations: int = option(8, "samples per problem for pass@k and maj@k (0: greedy only)", min=0)
    temperature: float = option(1.0, "sampling temperature of the samples")
    max_completion_length: int = option(16, "tokens generated per completion, at most", min=1)
    batch_size: int = option(512, "sequences per sampler call", min=1)
    seed: int = option(0, "held-out set and sampling seed")
    json: str | None = option(None, "also write the result (with per-problem results) to this file")
    dataset: str | None = option(None, "evaluate on a dataset's prompts instead of a task (local file or folder, "
                                 "or a hub dataset): correct = every --reward-funcs function verifies the completion")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str | None = option(None, "the split (None: train for a single file, else test)")
    prompt_column: str = option("prompt", "the column with the prompts (strings or chat messages)")
    answer_column: str | None = option(None, "the column with the gold answers, given to rewards as `answer`")
    reward_funcs: list[str] = option(help="--dataset: built-in names or import paths (package.module:function)",
                                     default_factory=list)
    min_reward: float = option(1.0, "the value each reward function must reach to verify")
    system_prompt: str | None = option(None, "system message for every prompt (rendered with the chat template)")
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")
    fim: bool = option(False, "fill-in-the-middle: exact match of one masked line per --data-dir val document")
    data_dir: str | None = option(None, "--fim: the shards of `nanoseek prepare` (their val split)")
    fim_mode: str = option("psm", "--fim: the infill prompt order", choices=("psm", "spm"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, EvalConfig)


def recorded_task(model_dir: Path) -> str | None:
    """The built-in task the run that wrote ``model_dir`` trained on, from the config file of its run directory
    (``<kind>_config.json`` beside ``checkpoints/``); None when the run trained on data files or nothing was
    recorded."""
    run_dirs = [model_dir] + ([model_dir.parent.parent] if model_dir.parent.name == "checkpoints" else [])
    for path in (d / f"{kind}_config.json" for d in run_dirs for kind in ("pretrain", "sft", "grpo", "ppo")):
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); pass --task NAME") from None
            return None if config.get("data") else config.get("task")
    return None


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of
    from nanoseek.policy import Policy
    from nanoseek.rewards import reward_name
    from nanoseek.tokenizer import encode_checked, load_tokenizer

    cfg = from_args(EvalConfig, args)
    check_ranges(cfg)
    if cfg.num_generations and not cfg.temperature > 0:  # checked before anything is loaded
        raise ValueError(f"--temperature {cfg.temperature}: must be > 0 for the --num-generations "
                         f"{cfg.num_generations} samples")
    directory = resolve_model_dir(cfg.model)
    if cfg.fim:
        return _fim(cfg, directory)
    head, ds, fns = _dataset(cfg) if cfg.dataset else _task(cfg, directory)
    rows = list(ds.rows[: cfg.n])
    tok = load_tokenizer(directory)
    policy = Policy.load(directory, tok.pad_id, tok.eos_id, device=device_of(cfg.device))
    if not cfg.dataset:  # characters the tokenizer lacks, or prompts over the context, would score silently wrong
        for r in rows:
            encode_checked(tok, r.prompt, f"task {head['task']!r} prompt {r.prompt!r}",
                           max_tokens=policy.model.config.max_position_embeddings)
    result = evaluate(policy, lambda p: tok.encode_prompt(p, cfg.system_prompt),
                      tok.decode, rows, Scorer(fns, [1.0] * len(fns), tok, columns=ds.columns),
                      [reward_name(f) for f in fns], k=cfg.num_generations, temperature=cfg.temperature,
                      max_completion_length=cfg.max_completion_length, batch_size=cfg.batch_size, seed=cfg.seed,
                      min_reward=cfg.min_reward, progress=True)
    summary = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(json.dumps({**head, **summary}, indent=2))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({**head, **result}, indent=2))
    return 0


def _dataset(cfg: EvalConfig):
    """``eval --dataset``: its prompts, verified by every ``--reward-funcs`` function."""
    from nanoseek.datasets import load_prompts
    from nanoseek.rewards import check_reward_columns, get_reward_fn

    if not cfg.reward_funcs:
        raise ValueError("--dataset: give the reward functions that verify a completion with --reward-funcs")
    fns = [get_reward_fn(n) for n in cfg.reward_funcs]
    split = cfg.dataset_split or ("train" if Path(cfg.dataset).expanduser().is_file() else "test")
    ds = load_prompts(cfg.dataset, config=cfg.dataset_config, split=split, prompt_column=cfg.prompt_column,
                      answer_column=cfg.answer_column)
    check_reward_columns(fns, ds.columns, f"--dataset {cfg.dataset}")
    return {"dataset": cfg.dataset, "reward_funcs": cfg.reward_funcs}, ds, fns


def _task(cfg: EvalConfig, directory: Path):
    """``eval --task``: up to ``--n`` distinct problems of the task's held-out split, verified by its reward."""
    from nanoseek.datasets import task_dataset
    from nanoseek.tasks import get_task, task_reward

    trained_on = recorded_task(directory)
    name = cfg.task or trained_on
    if name is None:
        raise ValueError(f"--model {directory} does not record a built-in task it trained on; pass --task NAME "
                         "(a built-in task such as arithmetic or countdown)")
    if trained_on and cfg.task and cfg.task != trained_on:
        print(f"note: evaluating on --task {cfg.task}; the model was trained on {trained_on}", file=sys.stderr)
    task = get_task(name)
    ds = task_dataset(task, cfg.n, "eval", seed=cfg.seed)
    if len(ds.rows) < cfg.n:
        print(f"the held-out split of {name!r} has {len(ds.rows)} distinct problems; evaluating all of them",
              file=sys.stderr)
    return {"task": name}, ds, [task_reward(task)]


def fim_exact_match(model: Transformer, tok: Tokenizer, documents: list[str], mode: str, seed: int, max_new: int,
                    batch_size: int) -> dict:
    """Single-line infilling (DeepSeek-Coder §3.1's benchmark): in each document one non-empty line, picked by a
    ``seed``ed rng, is the hole; the greedy middle up to the end sentinel, EOS or a newline is exact when it equals
    the line (surrounding spaces ignored). -> {"exact_match", "n", "results": [{line, infilled, exact}]}."""
    from nanoseek.fim import infill_prompt, sentinel_ids
    from nanoseek.generate import generate

    rng, cases = random.Random(seed), []
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        filled = [i for i, line in enumerate(lines) if line.strip()]
        if filled:
            i = rng.choice(filled)
            line = lines[i].rstrip("\n")
            cases.append((line, "".join(lines[:i]), lines[i][len(line):] + "".join(lines[i + 1:])))
    budget = model.config.max_position_embeddings - max_new
    prompts = [infill_prompt(prefix, suffix, tok, mode, budget) for _, prefix, suffix in cases]
    stops = (*tok.stop_ids, sentinel_ids(tok)[2])
    outputs = [out for start in range(0, len(prompts), batch_size)
               for out in generate(model, prompts[start:start + batch_size], max_new, stop_token_ids=stops)]
    results = []
    for (line, _, _), out in zip(cases, outputs):
        infilled = tok.decode(out).split("\n", 1)[0]
        results.append({"line": line, "infilled": infilled, "exact": infilled.strip() == line.strip()})
    return {"exact_match": sum(r["exact"] for r in results) / max(len(results), 1), "n": len(results),
            "results": results}


def _fim(cfg: EvalConfig, directory: Path) -> int:
    """``eval --fim --data-dir SHARDS``: ``fim_exact_match`` on the first ``--n`` documents of the val split."""
    from nanoseek.distributed import device_of
    from nanoseek.fim import val_documents
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import load_tokenizer

    if not cfg.data_dir:
        raise ValueError("--fim needs --data-dir: the shards of `nanoseek prepare` whose val split to infill")
    tok = load_tokenizer(directory)
    model = Transformer.from_pretrained(directory).to(device_of(cfg.device))
    result = {"model": str(directory), "data_dir": cfg.data_dir, "mode": cfg.fim_mode, **fim_exact_match(
        model, tok, val_documents(cfg.data_dir, tok, cfg.n), cfg.fim_mode, cfg.seed, cfg.max_completion_length,
        cfg.batch_size)}
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return 0
