"""Held-out evaluation of a checkpoint on a built-in task: greedy accuracy, maj@k and pass@k.

All completions go through ``nanoseek.generate.generate`` (latent KV cache) in batches. With k samples per
problem at temperature τ:
- ``accuracy``: the greedy completion is correct;
- ``pass@k``: at least one of the k samples is correct (the unbiased estimator of Chen et al. 2021 with n = k);
- ``maj@k``: the most frequent of the k sampled final answers (ties: the earliest) is correct;
- ``sample_accuracy``: the fraction of the k samples that are correct (pass@1 at temperature τ).

``greedy_correct`` and ``sample_correct`` keep the per-problem results (in order), for paired comparisons of
two checkpoints on the same problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.distributed import device_of
from nanoseek.rewards.math import extract_final_answer
from nanoseek.tasks import Example, Task


def _answer_key(text: str) -> str:
    """The answer a sample votes for in maj@k: its extracted final answer (``#### 42``, ``\\boxed{42}``,
    ``<answer>42</answer>``: ``nanoseek.rewards.math.extract_final_answer``), else its first line, without
    surrounding spaces; so two worked solutions that reach the same number vote together."""
    final = extract_final_answer(text)
    return final.strip() if final is not None else text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float = 0.0,
             batch_size: int = 512, seed: int = 0, desc: str | None = None) -> list[str]:
    """One completion per prompt (greedy when temperature is 0), decoded up to the first eos; ``generate``
    runs the model in eval mode."""
    from nanoseek.generate import generate

    ids = [tokenizer.encode(p, add_bos=tokenizer.bos_id is not None) for p in prompts]
    texts: list[str] = []
    bar = tqdm(total=len(ids), desc=desc, dynamic_ncols=True, leave=False, disable=desc is None)
    for b, start in enumerate(range(0, len(ids), batch_size)):
        chunk = ids[start : start + batch_size]
        outs = generate(model, chunk, max_new_tokens, temperature=temperature, stop_token_ids=(tokenizer.eos_id,),
                        seed=seed * 100_003 + b)
        for out in outs:
            out = list(out)
            texts.append(tokenizer.decode(out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out))
        bar.update(len(chunk))
    bar.close()
    return texts


def evaluate(model, tokenizer, examples: list[Example], task: Task, *, k: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 16, batch_size: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """Greedy accuracy, and with k > 0 pass@k, maj@k and sample accuracy, over ``examples`` (fractions 0–1)."""
    if not examples:
        raise ValueError("evaluate: no examples given")
    if k < 0 or temperature <= 0:
        raise ValueError(f"evaluate: need k >= 0 and temperature > 0 for the k samples (got k={k}, "
                         f"temperature={temperature})")
    prompts = [ex.prompt for ex in examples]
    greedy = complete(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, seed=seed,
                      desc="eval greedy" if progress else None)
    correct = [task.score(t, ex) for t, ex in zip(greedy, examples)]
    n = len(examples)
    result = {"n": n, "accuracy": sum(correct) / n, "greedy_correct": correct}
    if k:
        samples = complete(model, tokenizer, [p for p in prompts for _ in range(k)], max_new_tokens,
                           temperature=temperature, batch_size=batch_size, seed=seed + 1,
                           desc=f"eval {k} samples" if progress else None)
        passed = majority = 0.0
        per_problem = []
        for i, ex in enumerate(examples):
            texts = samples[i * k : (i + 1) * k]
            scores = [task.score(t, ex) for t in texts]
            per_problem.append(sum(scores) / k)
            passed += max(scores)
            votes = Counter(_answer_key(t) for t in texts)
            top = max(votes.values())
            winner = next(j for j, t in enumerate(texts) if votes[_answer_key(t)] == top)
            majority += scores[winner]
        result.update({f"pass@{k}": passed / n, f"maj@{k}": majority / n, "sample_accuracy": sum(per_problem) / n,
                       "sample_correct": per_problem, "k": k, "temperature": temperature})
    result["greedy_completions"] = [{"prompt": ex.prompt, "completion": t, "correct": c}
                                    for ex, t, c in list(zip(examples, greedy, correct))[:20]]
    return result


@torch.no_grad()
def evaluate_prompts(policy, encode, decode, rows: list, scorer, correct: list[str], *, k: int = 4,
                     temperature: float = 1.0, max_new_tokens: int = 16, batch_size: int = 256, seed: int = 0,
                     min_reward: float = 1.0) -> dict[str, float]:
    """Held-out metrics of a policy on dataset rows through its sampler (``Policy.sample``), scored by ``scorer``
    (``nanoseek.train.rollout.Scorer``). A completion is correct when every function named in ``correct`` gives
    at least ``min_reward`` and it ended by itself (``nanoseek.sample.verified``). Returns ``accuracy`` (greedy),
    ``reward`` (mean weighted reward of the greedy completions), ``mean_length`` (greedy completion tokens) and,
    with k > 0, ``pass@k`` (any of k samples at ``temperature`` correct) and ``sample_accuracy`` (their mean)."""
    from nanoseek.policy import SamplingParams
    from nanoseek.sample import verified

    if not rows:
        raise ValueError("evaluate_prompts: no held-out rows")
    was_training = policy.model.training
    policy.model.eval()

    def run(rows_rep: list, temp: float, seed_: int) -> tuple[list[bool], list[float], list[int]]:
        ok, total, lengths = [], [], []
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temp)
        for b, start in enumerate(range(0, len(rows_rep), batch_size)):
            chunk = rows_rep[start : start + batch_size]
            samples = policy.sample([encode(r.prompt) for r in chunk], params, seed_ * 100_003 + b)
            texts = [decode(c) for c in samples.completions]
            result = scorer.outcome(chunk, texts, samples.completions)
            for j, trunc in enumerate(samples.truncated):
                ok.append(verified([result.per_fn[n][j] for n in correct], trunc, min_reward))
            total += result.total
            lengths += [len(c) for c in samples.completions]
        return ok, total, lengths

    ok, total, lengths = run(list(rows), 0.0, seed)
    n = len(rows)
    out = {"accuracy": sum(ok) / n, "reward": sum(total) / n, "mean_length": sum(lengths) / n}
    if k:
        ok_k, _, _ = run([r for r in rows for _ in range(k)], temperature, seed + 1)
        out[f"pass@{k}"] = sum(any(ok_k[i * k : (i + 1) * k]) for i in range(n)) / n
        out["sample_accuracy"] = sum(ok_k) / (n * k)
    policy.model.train(was_training)
    return out


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="nanoseek checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    a("--task", default=None, help="built-in task (default: the task the checkpoint's run trained on)")
    a("--n", type=int, default=1000, help="distinct held-out problems (fewer when the held-out split is smaller)")
    a("--k", type=int, default=8, help="samples per problem for pass@k and maj@k (0: greedy only)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the k samples")
    a("--max-new-tokens", type=int, default=16)
    a("--batch-size", type=int, default=512)
    a("--seed", type=int, default=0, help="held-out set and sampling seed")
    a("--json", default=None, help="also write the result to this file")
    a("--dataset", default=None, help="evaluate on a dataset's prompts instead of a task (local file or folder, or a "
      "hub dataset): correct = every --reward-funcs function verifies the completion")
    a("--dataset-config", default=None, help="the hub dataset's configuration")
    a("--dataset-split", default=None, help="the split (default: train for a single file, else test)")
    a("--prompt-column", default="prompt", help="the column with the prompts (strings or chat messages)")
    a("--answer-column", default=None, help="the column with the gold answers, given to rewards as `answer`")
    a("--reward-funcs", nargs="*", default=[], help="--dataset: built-in names or import paths "
      "(package.module:function)")
    a("--min-reward", type=float, default=1.0, help="--dataset: the value each function must reach to verify")
    a("--system-prompt", default=None, help="--dataset: system message for every prompt (chat template)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def recorded_task(model_dir: Path) -> str | None:
    """The built-in task the run that wrote ``model_dir`` trained on, from the config file of its run directory
    (``<kind>_config.json`` beside ``checkpoints/``); None when the
    run trained on data files or nothing was recorded."""
    run_dirs = [model_dir] + ([model_dir.parent.parent] if model_dir.parent.name == "checkpoints" else [])
    for run_dir in run_dirs:
        for name in ("pretrain_config.json", "sft_config.json", "grpo_config.json", "ppo_config.json"):
            path = run_dir / name
            if path.is_file():
                try:
                    config = json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); pass --task NAME") from None
                return None if config.get("data") else config.get("task")
    return None


def check_flags(args: argparse.Namespace) -> None:
    """Range checks of ``nanoseek eval``'s numeric flags, before anything is loaded."""
    for name, low in (("n", 1), ("k", 0), ("max_new_tokens", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.k and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for the --k {args.k} samples, got {args.temperature}")


def run_dataset(args: argparse.Namespace) -> dict:
    """``eval --dataset``: greedy accuracy, pass@k, mean reward and length on a dataset's first ``--n`` prompts,
    through the policy's sampler (``evaluate_prompts``); a completion is correct when every reward function gives
    at least ``--min-reward`` and it ended by itself."""
    from nanoseek.datasets import load_prompts
    from nanoseek.policy import Policy
    from nanoseek.rewards import check_reward_columns, get_reward_fn, reward_name
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.rollout import Scorer

    if not args.reward_funcs:
        raise ValueError("--dataset: give the reward functions that verify a completion with --reward-funcs")
    fns = [get_reward_fn(n) for n in args.reward_funcs]
    split = args.dataset_split or ("train" if Path(args.dataset).expanduser().is_file() else "test")
    ds = load_prompts(args.dataset, config=args.dataset_config, split=split, prompt_column=args.prompt_column,
                      answer_column=args.answer_column)
    check_reward_columns(fns, ds.columns, f"--dataset {args.dataset}")
    rows = list(ds.rows[: args.n])
    tok = load_tokenizer(args.model)
    policy = Policy.load(args.model, tok.pad_id, tok.eos_id, device=device_of(args.device))
    scorer = Scorer(fns, [1.0] * len(fns), tok, columns=ds.columns)
    result = evaluate_prompts(
        policy, lambda p: tok.encode_prompt(p, args.system_prompt), tok.decode,
        rows, scorer, [reward_name(f) for f in fns], k=args.k, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, min_reward=args.min_reward)
    return {"dataset": args.dataset, "n": len(rows), "reward_funcs": args.reward_funcs, **result}


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir

    if args.dataset:
        check_flags(args)
        args.model = str(resolve_model_dir(args.model))
        result = run_dataset(args)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    from nanoseek.model.transformer import Transformer
    from nanoseek.tasks import distinct_examples, get_task
    from nanoseek.tokenizer import Tokenizer, encode_checked

    check_flags(args)
    directory = resolve_model_dir(args.model)
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"--model {directory}: no tokenizer.json; pass a checkpoint directory saved with its "
                         "tokenizer")
    trained_on = recorded_task(directory)
    name = args.task or trained_on
    if name is None:
        raise ValueError(f"--model {directory} does not record a built-in task it trained on; pass --task NAME "
                         "(a built-in task such as arithmetic or countdown)")
    if trained_on and args.task and args.task != trained_on:
        print(f"note: evaluating on --task {args.task}; the model was trained on {trained_on}", file=sys.stderr)
    task = get_task(name)
    tokenizer = Tokenizer.load(directory)
    model = Transformer.from_pretrained(directory).to(device_of(args.device))
    held_out = distinct_examples(task, args.n, "eval", seed=args.seed)
    for ex in held_out:  # characters the tokenizer lacks, or prompts over the context, would score silently wrong
        encode_checked(tokenizer, ex.prompt, f"task {name!r} prompt {ex.prompt!r}",
                       max_tokens=model.config.max_position_embeddings)
    if len(held_out) < args.n:
        print(f"the held-out split of {name!r} has {len(held_out)} distinct problems; evaluating all of them",
              file=sys.stderr)
    result = evaluate(model, tokenizer, held_out, task, k=args.k,
                      temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, seed=args.seed)
    summary = {k: v for k, v in result.items() if k not in ("greedy_completions", "greedy_correct", "sample_correct")}
    print(json.dumps({"task": name, **summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"task": name, **result}, indent=2))
    return 0
