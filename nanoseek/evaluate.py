"""Held-out evaluation of a policy on dataset prompts (``nanoseek eval``, the recipes, ``--eval-every``): each
prompt is completed greedily once and sampled k times at temperature τ; a completion is correct when it is
verified (``nanoseek.rollout.Scored.verified``) by every function named in ``correct``.
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from nanoseek.cli_args import add_arguments as add_flags
from nanoseek.cli_args import check_ranges, from_args, option
from nanoseek.data import bits_per_byte
from nanoseek.datasets import Row
from nanoseek.fim import infill_prompt, sentinel_ids, val_documents
from nanoseek.metrics import json_text
from nanoseek.model.transformer import Transformer
from nanoseek.policy import Policy, SamplingParams
from nanoseek.rewards import check_computed, check_reward_columns
from nanoseek.rewards.math import extract_final_answer
from nanoseek.rollout import Scorer, sample_and_score
from nanoseek.sample import PromptsConfig, load_prompts_of
from nanoseek.tokenizer import Tokenizer, encode_checked


def vote_key(text: str) -> str:
    """A sample's vote in maj@k: its final answer (``extract_final_answer``), else its first line."""
    final = extract_final_answer(text)
    return final.strip() if final is not None else text.strip().split("\n", 1)[0].strip()


def evaluate(policy, encode: Callable[[str | list[dict]], list[int]], decode: Callable[[list[int]], str],
             rows: list[Row], scorer: Scorer, correct: list[str] | None = None, *, k: int = 8, temperature: float = 1.0,
             max_completion_length: int = 16, batch_size: int = 512, seed: int = 0, min_reward: float = 1.0,
             progress: bool = False) -> dict:
    """The metrics (fractions 0–1; ``reward`` and ``mean_length`` of the greedy completions) with the per-problem
    ``greedy_correct`` / ``sample_correct`` (for paired comparisons) and the first 20 greedy completions.
    ``correct``: the names of the functions that verify (None: all of the scorer's)."""
    if not rows:
        raise ValueError("evaluate: no examples given")
    if k < 0 or (k and temperature <= 0):
        raise ValueError(f"evaluate: need k >= 0, and temperature > 0 if k > 0 (got k={k}, temperature={temperature})")
    was_training = policy.model.training
    policy.model.eval()

    def run(rows_: list[Row], temp: float, seed_: int, desc: str):
        scored = sample_and_score(policy, encode, decode, rows_, scorer,
                                  SamplingParams(max_tokens=max_completion_length, temperature=temp),
                                  seed_ * 100_003, batch_size=batch_size, desc=desc if progress else None)
        return scored, [float(ok) for ok in scored.verified(scorer.names if correct is None else correct, min_reward)]

    greedy, ok = run(list(rows), 0.0, seed, "eval greedy")
    n = len(rows)
    out = {"n": n, "accuracy": sum(ok) / n, "reward": sum(greedy.result.total) / n,
           "mean_length": sum(map(len, greedy.samples.completions)) / n, "greedy_correct": ok}
    if k:
        sampled, ok_k = run([r for r in rows for _ in range(k)], temperature, seed + 1, f"eval {k} samples")
        per_problem, majority = [], 0.0
        for i in range(n):
            scores, keys = ok_k[i * k : (i + 1) * k], [vote_key(t) for t in sampled.texts[i * k : (i + 1) * k]]
            per_problem.append(sum(scores) / k)
            majority += scores[keys.index(max(keys, key=keys.count))]  # max: the earliest of the most frequent
        out.update({f"pass@{k}": sum(p > 0 for p in per_problem) / n, f"maj@{k}": majority / n, "k": k,
                    "sample_accuracy": sum(per_problem) / n, "sample_correct": per_problem, "temperature": temperature})
    out["greedy_completions"] = [{"prompt": r.prompt, "completion": t, "correct": c}
                                 for r, t, c in list(zip(rows, greedy.texts, ok))[:20]]
    policy.model.train(was_training)
    return out


def scalar_metrics(result: dict) -> dict[str, float]:
    """The scalar metrics of an ``evaluate`` result (what ``--eval-every`` logs); ``temperature`` is a setting."""
    return {key: v for key, v in result.items() if isinstance(v, float) and key != "temperature"}


# ---------------------------------------------------------------------- CLI
@dataclass(frozen=True, kw_only=True)
class EvalConfig(PromptsConfig):
    """``nanoseek eval``: the checkpoint, the held-out prompts (a built-in task, by default the one its run trained
    on, or a dataset whose completions --reward-funcs verify) and the sampling of the k samples."""

    dataset_split: str | None = option(None, "the split (None: train for a single file, else test)")
    n: int = option(1000, "distinct held-out problems (fewer when the held-out split is smaller)", min=1)
    num_generations: int = option(8, "samples per problem for pass@k and maj@k (0: greedy only)", min=0)
    temperature: float = option(1.0, "sampling temperature of the samples", gt=0)
    max_completion_length: int = option(16, "tokens generated per completion, at most", min=1)
    batch_size: int = option(512, "sequences per sampler call", min=1)
    json: str | None = option(None, "also write the result (with per-problem results) to this file")
    fim: bool = option(False, "fill-in-the-middle: exact match of one masked line per --data-dir val document")
    data_dir: str | None = option(None, "--fim: the shards of `nanoseek prepare` (their val split)")
    fim_mode: str = option("psm", "--fim: the infill prompt order", choices=("psm", "spm"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of

    cfg = from_args(EvalConfig, args)
    check_ranges(cfg)
    if cfg.dataset and not cfg.reward_funcs:
        raise ValueError("--dataset: give the reward functions that verify a completion with --reward-funcs")
    if cfg.fim and not cfg.data_dir:
        raise ValueError("--fim needs --data-dir: the shards of `nanoseek prepare` whose val split to infill")
    directory = resolve_model_dir(cfg.model)
    if not cfg.dataset and not cfg.fim:  # the task its run trained on, from the run directory's <kind>_config.json
        run_dirs = [directory] + ([directory.parent.parent] if directory.parent.name == "checkpoints" else [])
        path = next((p for d in run_dirs for kind in ("pretrain", "sft", "grpo", "ppo")
                     if (p := d / f"{kind}_config.json").is_file()), None)
        try:
            recorded = {} if path is None else json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); pass --task NAME") from None
        trained_on = None if recorded.get("data") else recorded.get("task")
        if trained_on is None and cfg.task is None:
            raise ValueError(f"--model {directory} does not record a built-in task it trained on; pass --task NAME "
                             "(a built-in task such as arithmetic or countdown)")
        if trained_on and cfg.task and cfg.task != trained_on:
            print(f"note: evaluating on --task {cfg.task}; the model was trained on {trained_on}", file=sys.stderr)
        cfg = replace(cfg, task=cfg.task or trained_on)
    if not cfg.fim:
        ds, fns = load_prompts_of(cfg, cfg.n, "eval")
        check_reward_columns(fns, ds.columns, f"dataset {ds.name}")
        if cfg.task and len(ds.rows) < cfg.n:
            print(f"the held-out split of {cfg.task!r} has {len(ds.rows)} distinct problems; evaluating all of them",
                  file=sys.stderr)
    tok = Tokenizer.load(directory)
    if cfg.fim:  # one masked line in each of the first --n documents of the val split
        model = Transformer.from_pretrained(directory).to(device_of(cfg.device))
        head = {"model": str(directory), "data_dir": cfg.data_dir, "mode": cfg.fim_mode}
        result = fim_exact_match(model, tok, val_documents(cfg.data_dir, tok, cfg.n), cfg.fim_mode, cfg.seed,
                                 cfg.max_completion_length, cfg.batch_size)
    else:
        policy = Policy.load(directory, tok.pad_id, tok.eos_id, device=device_of(cfg.device))
        if cfg.task:  # characters the tokenizer lacks, or prompts over the context, would score silently wrong
            for r in ds.rows:
                encode_checked(tok, r.prompt, f"task {cfg.task!r} prompt {r.prompt!r}",
                               max_tokens=policy.model.config.max_position_embeddings)
        head = {"task": cfg.task} if cfg.task else {"dataset": cfg.dataset, "reward_funcs": cfg.reward_funcs}
        result = evaluate(policy, lambda p: tok.encode_prompt(p, cfg.system_prompt), tok.decode, list(ds.rows),
                          Scorer(fns, tokenizer=tok, timeout_s=cfg.reward_timeout_s, columns=ds.columns),
                          k=cfg.num_generations, temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed,
                          max_completion_length=cfg.max_completion_length, min_reward=cfg.min_reward, progress=True)
        check_computed(fns)
    print(json_text({**head, **{k: v for k, v in result.items() if not isinstance(v, list)}}, indent=2))
    if cfg.json:
        Path(cfg.json).write_text(json_text({**head, **result}, indent=2))
    return 0


def fim_exact_match(model: Transformer, tok: Tokenizer, documents: list[str], mode: str, seed: int, max_new: int,
                    batch_size: int) -> dict:
    """Single-line infilling (DeepSeek-Coder §3.1's benchmark): in each document one non-empty line, picked by a
    ``seed``ed rng, is the hole; the greedy middle up to the end sentinel, EOS or a newline is exact when it equals
    the line (surrounding spaces ignored). Also the bits per UTF-8 byte of the line's first ``max_new`` tokens given
    both sides in the FIM format (``line_bpb``) and given the prefix only (``line_bpb_left_to_right``).
    -> {"exact_match", "line_bpb", "line_bpb_left_to_right", "n", "results": [{line, infilled, exact}]}."""
    from nanoseek.generate import generate  # looked up per call, so that it can be replaced
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
    infilled = [tok.decode(out).split("\n", 1)[0] for out in outputs]
    results = [{"line": line, "infilled": fill, "exact": fill.strip() == line.strip()}
               for (line, _, _), fill in zip(cases, infilled)]
    targets = [tok.encode(line)[:max_new] for line, _, _ in cases]
    doc_start = tok.eos_id if tok.bos_id is None else tok.bos_id  # a document's start, as in the shards
    left = [[doc_start, *ids[max(len(ids) - budget + 1, 0):]] for ids in (tok.encode(p) for _, p, _ in cases)]
    n_bytes = sum(len(tok.decode(t).encode()) for t in targets)
    return {"exact_match": sum(r["exact"] for r in results) / max(len(results), 1),
            **{key: bits_per_byte(sum(map(partial(nats, model), given, targets)), n_bytes) for key, given in
               (("line_bpb", prompts), ("line_bpb_left_to_right", left))}, "n": len(results), "results": results}


@torch.no_grad()
def nats(model: Transformer, prompt: list[int], target: list[int]) -> float:
    """−log p(target | prompt) under ``model``, in nats."""
    ids = torch.tensor([prompt + target], device=next(model.parameters()).device)
    logp = model(ids)[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return -logp.gather(-1, ids[0, len(prompt):, None]).sum().item()
