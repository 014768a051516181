"""GRPO process supervision (DeepSeekMath §4.1.3): the per-step reward API, the built-in arithmetic process reward,
the trainer's per-token advantages against hand-computed values, every loss variant with (N, L) advantages against a
float64 reference, containment of broken process rewards, a learning run, the CLI and two torchrun ranks."""

import json
import logging
import math

import pytest
import torch
from test_grpo import DIST_HEADER, TASK, read_metrics, run_two_ranks, sft_checkpoint

from nanoseek import ModelConfig, Transformer
from nanoseek.policy import Policy, Samples
from nanoseek.rewards import StepRewards, compute_process_rewards
from nanoseek.rewards.process import arithmetic_process_reward, check_steps
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig
from nanoseek.train.loop import config_dict
from nanoseek.train.losses import grpo_loss
from nanoseek.train.rl import RLTrainer, _log_completions

EPS = 1e-4  # GRPOConfig.advantage_eps


def random_checkpoint(directory):
    torch.manual_seed(0)
    tok = Tokenizer.char()
    Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(directory)
    tok.save(directory)
    return directory


def make_trainer(model_dir, **kw) -> RLTrainer:
    tok = Tokenizer.load(model_dir)
    cfg = GRPOConfig(model=str(model_dir), task_kwargs=TASK, progress=False, **kw)
    return RLTrainer(cfg, Policy.load(model_dir, tok.pad_id, tok.eos_id), tok, GRPO)


def scripted_samples(completions: list[list[int]], max_len: int, eos: int) -> Samples:
    """What ``Policy.sample`` returns for these completions: zero log-probs, truncated = the length cap without eos."""
    return Samples(completions, [[0.0] * len(c) for c in completions],
                   [len(c) == max_len and eos not in c for c in completions])


# ---------------------------------------------------------------------- the API
@pytest.mark.parametrize("steps,match", [
    (StepRewards([1.0], [0, 1]), "1 step rewards but 2 step ends"),
    (StepRewards([1.0, 0.0], [2, 1]), "non-decreasing"),
    (StepRewards([1.0], [3]), r"must lie in \[0, 3\)"),
    (StepRewards([1.0], [-1]), r"must lie in \[0, 3\)"),
    (StepRewards([math.nan], [0]), "finite"),
    (StepRewards([1.0], [0.5]), "integer token positions"),
    (StepRewards([1.0], None), "list of ints"),
    ([1.0], "return StepRewards"),
])
def test_check_steps_names_the_sample(steps, match):
    with pytest.raises(ValueError, match=f"my_prm: sample 5: .*{match}"):
        check_steps(steps, 3, 5, "my_prm")


def test_check_steps_accepts_valid():
    assert check_steps(None, 3, 0) is None
    assert check_steps(StepRewards([1, 0], [1, 1]), 3, 0) == StepRewards([1.0, 0.0], [1, 1])  # shared end token
    assert check_steps(StepRewards([], []), 0, 0) == StepRewards([], [])


def test_arithmetic_process_reward_char_tokens():
    tok = Tokenizer.char()
    cases = {  # completion (eos appended unless marked truncated) -> (rewards, ends)
        "85": ([1, 1, 1], [0, 1, 2]),  # both digits, then the number ends (eos)
        "8": ([1, 0], [0, 1]),  # eos where the 5 should be
        "851": ([1, 1, 0], [0, 1, 2]),  # the number goes on
        "95": ([0], [0]),  # wrong first digit: scoring stops
        " 85": ([1, 1, 1], [1, 2, 3]),  # leading space skipped, as the task's score does
        "85\n9": ([1, 1, 1], [0, 1, 2]),  # a non-digit ends the number
        "": ([0], [0]),  # eos right away
    }
    ids = [tok.encode(c, add_eos=True) for c in cases] + [tok.encode("85"), tok.encode("8")]  # two truncated
    got = arithmetic_process_reward(None, None, ids, answer=["85"] * len(ids), tokenizer=tok)
    want = [StepRewards([float(r) for r in rs], es) for rs, es in cases.values()]
    want += [StepRewards([1.0, 1.0], [0, 1]), StepRewards([1.0], [0])]  # no token decided the end / the 5
    assert got == want


def test_arithmetic_process_reward_multi_char_tokens():
    """A token emitting several characters ends several steps (BPE-like "85"); eos ends the number."""
    pieces = {10: "8", 11: "5", 12: "85", 13: " -", 14: "3", 2: ""}

    class Pieces:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    got = arithmetic_process_reward(None, None, [[12, 2], [13, 14, 2], [10, 12, 2]], answer=["85", "-3", "85"],
                                    tokenizer=Pieces())
    assert got == [StepRewards([1.0, 1.0, 1.0], [0, 0, 1]), StepRewards([1.0, 1.0, 1.0], [0, 1, 2]),
                   StepRewards([1.0, 0.0], [0, 1])]


# ---------------------------------------------------------------------- trainer wiring
def test_trainer_token_advantages_by_hand(tmp_path):
    """Scripted completions through the trainer: step positions, group normalization, padding and metrics."""
    trainer = make_trainer(random_checkpoint(tmp_path / "m"), num_generations=3, prompts_per_step=2,
                           max_completion_length=4, process_reward="arithmetic", lr=1e-3)
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_id
    exs = trainer.prompts(1)

    def sample(prompts, params, seed):
        assert prompts == [trainer.encode(ex.prompt) for ex in exs for _ in range(3)]  # G rows per prompt
        assert params.max_tokens == 4
        a, b = exs[0].answer, exs[1].answer  # single digits
        wa, wb = str((int(a) + 1) % 10), str((int(b) + 1) % 10)
        texts = [a, wa, a + "7", " " + b, "    ", wb]  # the 5th is 4 spaces, truncated: no step at all
        return scripted_samples([tok.encode(t) + ([eos] if len(t) < 4 else []) for t in texts], 4, eos)

    trainer.policy.sample = sample
    rollout, _ = trainer.collect(1)
    assert [s.rewards for s in rollout.steps] == [[1, 1], [0], [1, 0], [1, 1], [], [0]]
    assert [s.ends for s in rollout.steps] == [[0, 1], [0], [0, 1], [1, 2], [], [0]]
    assert rollout.truncated.tolist() == [False, False, False, False, True, False]
    assert rollout.batch.completion_mask.sum(1).tolist() == [2, 2, 3, 3, 4, 2]  # padding is masked out
    assert rollout.rewards.tolist() == [1, 0, 0, 1, 0, 0]  # outcome rewards are still computed
    # group 1: steps {1, 1, 0, 1, 0}, mean 3/5, unbiased std sqrt(0.3); group 2: {1, 1, 0}, mean 2/3, std sqrt(1/3)
    p1, n1 = 0.4 / (math.sqrt(0.3) + EPS), -0.6 / (math.sqrt(0.3) + EPS)
    p2, n2 = (1 / 3) / (math.sqrt(1 / 3) + EPS), (-2 / 3) / (math.sqrt(1 / 3) + EPS)
    want = torch.tensor([
        [2 * p1, p1, 0, 0],  # "a" eos: Â_t = Σ of the steps ending at or after t; eos ends the number
        [n1, 0, 0, 0],  # wrong digit; its eos is after the last step
        [p1 + n1, n1, 0, 0],  # "a7": the 7 is the wrong step
        [2 * p2, 2 * p2, p2, 0],  # " b" eos: the space precedes both steps
        [0, 0, 0, 0],  # no steps: zero advantage
        [n2, 0, 0, 0],
    ])
    m, prepared = trainer.step(1)  # samples the same scripted completions again
    torch.testing.assert_close(prepared.advantages, want, rtol=1e-6, atol=1e-6)
    _log_completions(tmp_path / "completions.jsonl", 1, prepared, 6)
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [len(s["advantage"]) for s in logged] == [2, 2, 3, 3, 4, 2]  # logged per-token advantages, one per token
    for s, row, n in zip(logged, want, [2, 2, 3, 3, 4, 2]):
        assert s["advantage"] == pytest.approx(row[:n].tolist(), rel=1e-6, abs=1e-6)
    assert m["rewards/process/mean"] == pytest.approx(5 / 8)
    assert m["rewards/process/frac_no_steps"] == pytest.approx(1 / 6)
    assert m["reward"] == pytest.approx(2 / 6) and m["rewards/arithmetic_reward/mean"] == pytest.approx(2 / 6)


def test_dynamic_sampling_drops_groups_with_equal_step_rewards(tmp_path):
    trainer = make_trainer(random_checkpoint(tmp_path / "m"), num_generations=2, prompts_per_step=2,
                           max_completion_length=3, process_reward="arithmetic", dynamic_sampling=True,
                           max_resample_rounds=1)
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_id
    rounds = []

    def sample(prompts, params, seed):
        round_ = len(rounds)
        rounds.append(seed)
        exs = trainer.prompts(1, round_)  # each resampling round draws fresh prompts
        assert prompts == [trainer.encode(ex.prompt) for ex in exs for _ in range(2)]
        a, b = exs[0].answer, exs[1].answer
        wb = str((int(b) + 1) % 10)
        # round 0: both groups have equal step rewards (all correct / all wrong at once) -> dropped;
        # round 1: group a is correct + "a7"; group b is wrong twice (equal outcome rewards 0) but one got a step right
        texts = [[a, a, wb, wb], [a, a + "7", b + "1", wb]][round_]
        return scripted_samples([tok.encode(t) + [eos] for t in texts], 3, eos)

    trainer.policy.sample = sample
    rollout, seen = trainer.collect(1)
    assert len(rounds) == 2 and rounds[0] != rounds[1]  # one resampling round, seeded differently
    assert [s.rewards for s in rollout.steps] == [[1, 1], [1, 0], [1, 0], [0]]
    assert rollout.rewards.tolist() == [1, 0, 0, 0]  # group b kept: informative steps, flat outcome
    assert rollout.batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert seen.groups == 4 and seen.zero_std_groups == 3  # frac_reward_zero_std still counts outcome rewards


# ---------------------------------------------------------------------- the loss with (N, L) advantages
def reference_loss(logp, old, ref, adv, mask, *, loss_type, level, beta, eps_low, eps_high, max_len):
    """float64 loops: the loss and its gradient d loss / d logp, derived by hand. Per token the surrogate's gradient
    is −ρ·Â unless the clipped term is the smaller one (then 0); ρ is π_t/π_old,t or, for the sequence level,
    GSPO-token's ratio with the value s_i and the gradient of the token's own log-prob. The k3 KL's gradient is
    β(1 − exp(ref − logp))."""
    B, L = mask.shape
    lp, old, ref, adv, m = (x.double().tolist() for x in (logp, old, ref, adv, mask))
    total = sum(map(sum, m))
    loss, grad, clipped = 0.0, [[0.0] * L for _ in range(B)], [0, 0]
    for i in range(B):
        n = sum(m[i])
        w = {"grpo": 1 / (B * max(n, 1)), "bnpo": 1 / total, "dapo": 1 / total, "dr_grpo": 1 / (B * max_len)}[loss_type]
        s = math.exp(sum((lp[i][t] - old[i][t]) * m[i][t] for t in range(L)) / max(n, 1))
        for t in range(L):
            if not m[i][t]:
                continue
            rho = math.exp(lp[i][t] - old[i][t]) if level == "token" else s
            a = adv[i][t]
            c = min(max(rho, 1 - eps_low), 1 + eps_high)
            d = ref[i][t] - lp[i][t]
            loss += w * (-min(rho * a, c * a) + beta * (math.exp(d) - d - 1))
            is_clipped = c * a < rho * a
            clipped[is_clipped] += 1
            grad[i][t] = w * ((0.0 if is_clipped else -rho * a) + beta * (1 - math.exp(d)))
    return loss, torch.tensor(grad, dtype=torch.float64), clipped


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level,beta,eps_low,eps_high", [("token", 0.0, 0.2, 0.28), ("token", 0.04, 0.2, 0.2),
                                                         ("sequence", 0.04, 3e-4, 4e-4), ("sequence", 0.0, 0.2, 0.2)])
def test_loss_with_token_advantages_float64(loss_type, level, beta, eps_low, eps_high):
    torch.manual_seed(4)
    B, L, max_len = 5, 6, 8
    old = torch.randn(B, L) * 0.5 - 2
    logp = (old + torch.randn(B, L) * 0.3).requires_grad_()
    ref = old + torch.randn(B, L) * 0.2
    adv = torch.randn(B, L)  # signs vary along each sequence, as with process supervision
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                        loss_type=loss_type, importance_sampling_level=level, max_completion_length=max_len)
    loss.backward()
    want, want_grad, clipped = reference_loss(logp.detach(), old, ref, adv, mask, loss_type=loss_type, level=level,
                                              beta=beta, eps_low=eps_low, eps_high=eps_high, max_len=max_len)
    assert clipped[0] > 0 and clipped[1] > 0  # both branches of the min are exercised
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logp.grad.double(), want_grad, rtol=1e-5, atol=1e-7)


def test_sequence_level_keeps_token_credit():
    """At π = π_old (μ = 1) GSPO-token's gradient equals the token level's: each token keeps its own advantage,
    unlike a bare (B, 1) sequence ratio, which credits every token with the sequence's mean advantage."""
    torch.manual_seed(5)
    old = torch.randn(3, 4) - 2
    adv, mask = torch.randn(3, 4), torch.ones(3, 4)
    grads = []
    for level in ("token", "sequence"):
        logp = old.clone().requires_grad_()
        grpo_loss(logp, old, adv, mask, importance_sampling_level=level)[0].backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], -adv / 12)  # seq-mean-token-mean: 1 / (B · |o|)


# ---------------------------------------------------------------------- failures are contained
def test_raising_process_reward_is_contained(tmp_path, caplog):
    def boom(prompts, completions, completion_ids, **kw):
        raise RuntimeError("prm exploded")

    trainer = make_trainer(random_checkpoint(tmp_path / "m"), num_generations=2, prompts_per_step=2,
                           max_completion_length=3, process_reward=boom, lr=1e-2)
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        m, rollout = trainer.step(1)
    assert "process reward boom failed: RuntimeError: prm exploded" in caplog.text
    assert m["rewards/process/frac_no_steps"] == 1 and all(v == v for v in m.values() if isinstance(v, float))
    assert rollout.steps == (None,) * 4 and rollout.advantages.shape == rollout.batch.completion_mask.shape
    assert (rollout.advantages == 0).all()  # zero per-token advantage everywhere: the policy does not move
    for k, v in trainer.policy.model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert config_dict(trainer.cfg)["process_reward"] == "boom"


def test_bad_values_and_hangs_are_contained(caplog):
    ids = [[5, 6, 2], [7, 2]]

    def half_bad(prompts, completions, completion_ids, **kw):
        assert completion_ids == ids and kw["answer"] == ["1", "2"]
        return [StepRewards([1.0], [2]), StepRewards([1.0, 0.0], [1, 0])]

    with caplog.at_level(logging.WARNING):
        steps, errors = compute_process_rewards(half_bad, ["p", "q"], ["ab", "c"], ids, {"answer": ["1", "2"]})
    assert steps == [StepRewards([1.0], [2]), None] and len(errors) == 1
    assert "half_bad: sample 1: step ends must be non-decreasing" in caplog.text
    steps, errors = compute_process_rewards(lambda p, c, completion_ids: [None], ["p", "q"], ["ab", "c"], ids)
    assert steps == [None, None] and "returned 1 values for 2 completions" in errors[0]

    def hang(prompts, completions, completion_ids, **kw):
        while True:
            pass

    steps, errors = compute_process_rewards(hang, ["p", "q"], ["ab", "c"], ids, timeout_s=0.5)
    assert steps == [None, None] and "no result within 0.5 s" in errors[0]


def test_config_rejects_what_process_supervision_cannot_do(capsys):
    from nanoseek.cli import main
    from nanoseek.train.ppo import PPOConfig

    with pytest.raises(ValueError, match="--process-reward 'nope'.*arithmetic"):
        GRPOConfig(model="m", process_reward="nope").validate()
    with pytest.raises(ValueError, match="--rloo"):
        GRPOConfig(model="m", process_reward="arithmetic", rloo=True).validate()
    with pytest.raises(ValueError, match="--overlong-buffer"):
        GRPOConfig(model="m", process_reward="arithmetic", overlong_buffer=2).validate()
    # PPO has no process supervision: neither its config nor its command takes a process reward
    with pytest.raises(TypeError, match="process_reward"):
        PPOConfig(model="m", process_reward="arithmetic")
    with pytest.raises(SystemExit) as exit_:
        main(["ppo", "--model", "m", "--process-reward", "arithmetic"])
    assert exit_.value.code == 2 and "unrecognized arguments: --process-reward" in capsys.readouterr().err


# ---------------------------------------------------------------------- end to end
def test_process_supervision_learns_arithmetic(tmp_path):
    from nanoseek.train.grpo import train_grpo

    model_dir = sft_checkpoint(tmp_path / "sft")
    cfg = GRPOConfig(model=str(model_dir), out=str(tmp_path / "run"), task_kwargs=TASK, num_generations=8,
                     prompts_per_step=16, max_completion_length=4, steps=30, lr=1e-3, num_iterations=2,
                     process_reward="arithmetic", progress=False)
    train_grpo(cfg)
    ms = read_metrics(tmp_path / "run")
    r, pr = [m["reward"] for m in ms], [m["rewards/process/mean"] for m in ms]
    assert len(r) == 30
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.15, r
    assert sum(pr[-5:]) / 5 > sum(pr[:5]) / 5 + 0.1, pr


def test_cli_process_reward(tmp_path, capsys):
    from nanoseek.cli import main

    model_dir = random_checkpoint(tmp_path / "m")
    out = tmp_path / "run"
    argv = ["grpo", "--model", str(model_dir), "--task", "arithmetic", "--num-generations", "4",
            "--prompts-per-step", "2", "--max-completion-length", "4", "--steps", "2", "--process-reward",
            "arithmetic", "--loss-type", "dr_grpo", "--importance-sampling-level", "sequence", "--num-iterations",
            "2", "--out", str(out), "--no-progress", "--log-completions-every", "1"]
    assert main(argv) == 0
    for m in read_metrics(out):
        for key in ("reward", "rewards/arithmetic_reward/mean", "rewards/process/mean",
                    "rewards/process/frac_no_steps", "loss", "grad_norm"):
            assert math.isfinite(m[key]), key
    assert json.loads((out / "grpo_config.json").read_text())["process_reward"] == "arithmetic"
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert all(isinstance(s["advantage"], list) and len(s["advantage"]) >= 1 for s in samples)
    argv[argv.index("--process-reward") + 1] = "nope"
    assert main(argv) != 0
    assert "--process-reward 'nope': give a built-in name (arithmetic)" in capsys.readouterr().err


DIST_SCRIPT = DIST_HEADER + """
cfg = GRPOConfig(model=model_dir, task_kwargs={"max_operand": 4, "ops": "+"}, num_generations=4, prompts_per_step=4,
                 max_completion_length=3, lr=1e-3, process_reward="arithmetic", scale_rewards="batch")
trainer = RLTrainer(cfg, Policy.load(model_dir, tok.pad_id, tok.eos_id), tok, GRPO, rank, world)
first, rollout = trainer.step(1)
metrics = [first, trainer.step(2)[0]]
torch.save({"adv": rollout.advantages, "steps": [(s.rewards, s.ends) for s in rollout.steps], "metrics": metrics,
            "weights": trainer.policy.model.state_dict()}, f"{out}/{rank}.pt")
"""


def test_torchrun_two_ranks_batch_scaled_steps(tmp_path):
    """Groups stay on their rank; "batch" scaling takes the std over both ranks' steps; metrics are gathered."""
    model_dir = sft_checkpoint(tmp_path / "sft", steps=20)
    r0, r1 = run_two_ranks(DIST_SCRIPT, model_dir, tmp_path)
    everything = [r for rs, _ in r0["steps"] + r1["steps"] for r in rs]
    n = len(everything)
    mean = sum(everything) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in everything) / (n - 1))
    assert std > 0
    for res in (r0, r1):
        width = res["adv"].shape[1]  # the rank's longest completion (at most max_completion_length)
        assert 1 <= width <= 3
        want = torch.zeros(8, width)
        for g in range(0, 8, 4):  # a group's mean over its own steps, the std over both ranks'
            group = [r for rs, _ in res["steps"][g : g + 4] for r in rs]
            for i in range(g, g + 4):
                for t in range(width):
                    rs, es = res["steps"][i]
                    want[i, t] = sum((r - sum(group) / len(group)) / (std + EPS) for r, e in zip(rs, es) if e >= t)
        torch.testing.assert_close(res["adv"], want, rtol=1e-5, atol=1e-6)
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], rtol=0, atol=0)
    for m0, m1 in zip(r0["metrics"], r1["metrics"]):
        for k in ("reward", "rewards/process/mean", "rewards/process/frac_no_steps", "loss"):
            assert m0[k] == pytest.approx(m1[k]), k
