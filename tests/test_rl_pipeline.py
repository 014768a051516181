"""The RL pipeline's stages: micro-batch planning by length (padding bound), one optimize loop whose gradient does not
depend on how a mini-batch is split (every loss variant against a full-batch reference), the sampler's log-probs
against the trainer's, and flags that are refused instead of ignored."""

import itertools

import pytest
import torch
from test_grpo import reference_logprobs, tiny_llama, tiny_nanoseek

from nanoseek.policy import Batch, Policy, SamplingParams
from nanoseek.rollout import Rollout, Sampling
from nanoseek.tasks import Example
from nanoseek.train.grpo import GRPO, GRPOConfig
from nanoseek.train.loop import narrow
from nanoseek.train.losses import grpo_loss
from nanoseek.train.optimize import (
    PAD_TOLERANCE,
    OptimizeConfig,
    OptimizeStats,
    optimize,
    plan_micro_batches,
    rollout_logprobs,
)


def mixed_batch(n_groups: int = 6, G: int = 8, seed: int = 0) -> Batch:
    """Groups of G completions with lengths from a geometric-like spread (a few long, most short), R1-style."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 90, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_groups)]
    lengths = (torch.distributions.Exponential(1 / 60).sample((n_groups * G,)).clamp(1, 384)).long().tolist()
    completions = [torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    return Batch.build(prompts, [i // G for i in range(n_groups * G)], completions, pad_id=0)


@pytest.mark.parametrize("shared", [True, False])
def test_plan_micro_batches_bounds_padding(shared):
    torch.manual_seed(0)
    batch = mixed_batch()
    rows = torch.randperm(len(batch))
    plans = plan_micro_batches(batch, rows, max_rows=0, shared=shared)
    assert sorted(torch.cat(plans).tolist()) == list(range(len(batch)))  # every row once
    processed = real = 0
    for p in plans:
        pr, re = batch.select(p).token_counts(shared)
        processed, real = processed + pr, real + re
    one_pass, _ = batch.token_counts(shared)  # everything padded to the longest row
    assert processed <= PAD_TOLERANCE * real < one_pass / 2
    assert all(len(p) <= 5 for p in plan_micro_batches(batch, rows, max_rows=5, shared=shared))


def test_select_trims_to_its_own_longest_row():
    batch = Batch.build([[1, 2, 3, 4, 5], [1, 2]], [0, 0, 1, 1], [[7] * 9, [7], [8, 8], [8]], pad_id=0)
    sub = batch.select(torch.tensor([1, 3]))
    assert sub.completion_ids.shape == (2, 1) and sub.prompt_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 0, 0, 0]]
    sub = batch.select(torch.tensor([2, 3]))
    assert sub.completion_ids.shape == (2, 2) and sub.prompt_ids.tolist() == [[1, 2]]
    assert sub.prompt_index.tolist() == [0, 0] and sub.token_counts(True) == (2 + 4, 2 + 3)


def fixed_rollout(model, per_token: bool, seed: int = 0) -> Rollout:
    """Two groups of three completions of mixed lengths with fixed advantages, old and reference log-probs near
    the model's own (so that clipping and the KL term are both active)."""
    g = torch.Generator().manual_seed(seed)
    batch = Batch.build([[1, 5, 6, 7], [1, 9]], [0, 0, 0, 1, 1, 1],
                        [[20, 21, 2], [30, 31, 32, 33, 34, 35, 36], [40], [41, 42, 2], [43], [44, 45, 46, 47, 48]],
                        pad_id=0)
    with torch.no_grad():
        logp = reference_logprobs(model, batch)
    mask = batch.completion_mask
    shape = mask.shape if per_token else mask.shape[:1]
    return Rollout(batch, (Example("a", "", "1"), Example("b", "", "2")), ("",) * 6, torch.zeros(6), {},
                   torch.zeros(6, dtype=torch.bool), logp, advantages=torch.randn(shape, generator=g),
                   old_logp=(logp + 0.3 * torch.randn(mask.shape, generator=g)) * mask,
                   ref_logp=(logp + 0.3 * torch.randn(mask.shape, generator=g)) * mask)


VARIANTS = [dict(loss_type=lt, importance_sampling_level=lv, beta=b, epsilon_high=eh, per_token=pt)
            for lt, lv, b, eh, pt in itertools.product(["grpo", "bnpo", "dapo", "dr_grpo"], ["token", "sequence"],
                                                       [0.0, 0.1], [None, 0.28], [False, True])
            if (b, eh, pt) in ((0.0, None, False), (0.1, 0.28, True), (0.1, None, False))]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_optimize_gradient_equals_full_batch_reference(variant):
    """One optimizer step through ``optimize`` (micro-batches of 1, 4 rows, or planned by length) moves the weights
    exactly as SGD on the loss of the whole rollout computed at once from full logits."""
    variant = dict(variant)
    per_token = variant.pop("per_token")
    torch.manual_seed(0)
    model = tiny_nanoseek()
    rollout = fixed_rollout(model, per_token)
    cfg = GRPOConfig(model="unused", num_generations=3, max_completion_length=8, epsilon=0.2, **variant)
    mask = rollout.batch.completion_mask
    policy = Policy(model, pad_id=0, eos_id=2)
    algo = GRPO(narrow(GRPO.Params, cfg), narrow(Sampling, cfg), narrow(OptimizeConfig, cfg), policy)
    loss, _ = grpo_loss(reference_logprobs(model, rollout.batch), rollout.old_logp, rollout.advantages, mask,
                        ref_logp=rollout.ref_logp, beta=cfg.beta, epsilon_high=cfg.epsilon_high,
                        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                        max_completion_length=8)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    start = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for micro in (1, 4, 0):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        optimize(policy, rollout, algo.loss, [(model, opt)], OptimizeConfig(micro_batch_size=micro),
                 torch.Generator().manual_seed(0), OptimizeStats(), max_grad_norm=1e9)
        moved = dict(model.named_parameters())
        assert want.keys() <= moved.keys() and len(want) > 10
        for n in want:
            torch.testing.assert_close(start[n] - moved[n].detach(), want[n], rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("kind", ["nanoseek", "llama"])
def test_sampler_logprobs_match_trainer(kind):
    """The log-probs the sampler reports equal the trainer's recomputation (fp32): no importance correction needed."""
    torch.manual_seed(0)
    model = tiny_nanoseek() if kind == "nanoseek" else tiny_llama()
    policy = Policy(model, pad_id=0, eos_id=2)
    prompts = [[1, 5, 6], [1, 9, 10, 11, 12]]
    samples = policy.sample([p for p in prompts for _ in range(4)], SamplingParams(12, temperature=0.8), seed=3)
    assert any(samples.truncated) and not all(samples.truncated) or kind == "llama"
    for c, t in zip(samples.completions, samples.truncated):
        assert t == (len(c) == 12 and c[-1] != 2) and (2 not in c[:-1])
    batch = Batch.build(prompts, [i // 4 for i in range(8)], samples.completions, pad_id=0)
    sampler = torch.zeros(batch.completion_ids.shape)
    for i, lp in enumerate(samples.logprobs):
        sampler[i, : len(lp)] = torch.tensor(lp)
    trainer = rollout_logprobs(policy, batch, OptimizeConfig(temperature=0.8), OptimizeStats())
    assert (trainer - sampler).abs().max() <= 1e-4


def test_trainer_logs_logprob_gap_and_padding(tmp_path):
    from test_grpo import TASK, read_metrics, sft_checkpoint

    from nanoseek.train.grpo import train_grpo

    model_dir = sft_checkpoint(tmp_path / "sft", steps=5)
    for mu in (1, 2):
        out = tmp_path / f"run{mu}"
        train_grpo(GRPOConfig(model=str(model_dir), out=str(out), task_kwargs=TASK, num_generations=4,
                              prompts_per_step=4, max_completion_length=6, steps=1, num_iterations=mu,
                              progress=False))
        m = read_metrics(out)[0]
        assert 0 <= m["sampling/logprob_diff/max"] <= 1e-4 and m["sampling/logprob_diff/mean"] <= 1e-5
        assert m["tokens/processed_over_real"] >= 1.0


# ---------------------------------------------------------------------- flags
def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """-> (exit code, stdout, stderr) of ``nanoseek ARGV``."""
    from nanoseek.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse: unknown flag, bad choice, --help
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["ppo", "--loss-type", "dapo"], "unrecognized arguments: --loss-type"),
    (["ppo", "--rloo"], "unrecognized arguments: --rloo"),
    (["ppo", "--scale-rewards", "none"], "unrecognized arguments: --scale-rewards"),
    (["ppo", "--importance-sampling-level", "sequence"], "unrecognized arguments"),
    (["ppo", "--ref-reset-every", "2"], "unrecognized arguments: --ref-reset-every"),
    (["ppo", "--dynamic-sampling"], "unrecognized arguments: --dynamic-sampling"),
    (["grpo", "--micro-batch-size", "-2"], "--micro-batch-size -2: must be >= 0"),
    (["grpo", "--epsilon", "-1"], "--epsilon -1.0: must be > 0"),
    (["grpo", "--save-every", "-1"], "--save-every -1: must be >= 0"),
    (["grpo", "--num-generations", "1"], "--num-generations 1: must be >= 2"),
    (["grpo", "--top-p", "1.5"], "--top-p 1.5: must be <= 1"),
    (["grpo", "--loss-type", "ppo"], "invalid choice"),
    (["pretrain", "--seq-len", "0"], "--seq-len 0: must be >= 1"),
])
def test_bad_flags_are_refused_at_start(argv, message, capsys, tmp_path):
    code, _, err = run_cli(argv + (["--model", str(tmp_path)] if argv[0] != "pretrain" else []) +
                        ["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_help_shows_every_field_with_its_default(capsys):
    from dataclasses import fields

    from nanoseek.train.ppo import PPOConfig

    for command, cls in (("grpo", GRPOConfig), ("ppo", PPOConfig)):
        code, out, _ = run_cli([command, "--help"], capsys)
        out = " ".join(out.split())
        assert code == 0
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in out, (command, f.name)
        want = "G completions per prompt (a group) (default: 8)" if command == "grpo" else \
            "completions per prompt (PPO needs no group) (default: 1)"
        assert want in out


def test_rl_summary_schema_and_stop_at(tmp_path):
    """GRPO runs in the same loop as pretraining: the same summary keys, --stop-at, then --resume to the end."""
    from test_grpo import TASK, sft_checkpoint

    from nanoseek.train.grpo import train_grpo

    model_dir = sft_checkpoint(tmp_path / "sft", steps=2)
    kw = dict(model=str(model_dir), out=str(tmp_path / "run"), task_kwargs=TASK, num_generations=2,
              prompts_per_step=2, max_completion_length=3, steps=3, progress=False)
    first = train_grpo(GRPOConfig(stop_at=2, **kw))
    assert {"steps", "wall_time_s", "interrupted", "run_dir", "checkpoint", "resumed_from"} <= set(first)
    assert first["steps"] == 2 and not first["interrupted"] and first["checkpoint"].endswith("step_00000002")
    rest = train_grpo(GRPOConfig(resume=True, **kw))
    assert rest["steps"] == 3 and rest["resumed_from"].endswith("step_00000002")
