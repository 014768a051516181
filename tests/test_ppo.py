"""The PPO baseline: GAE, whitening and the clipped value loss by hand; the critic; a trainer step."""

import pytest
import torch

from nanoseek.train.losses import gae, value_loss, whiten
from nanoseek.train.ppo import PPO, Critic, PPOConfig
from tests.test_grpo import TASK, sft_checkpoint


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.9]])  # row 1's last value is padding
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.5·0.3 = 0.25, A0 = 0.1 + 0.5·0.25 = 0.225
    # row 1: δ = [0.1, 0.4]; A1 = 0.4, A0 = 0.1 + 0.5·0.4 = 0.3
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.3, 0.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [0.8, 1.0, 0.0]]))


def test_gae_matches_float64_loop():
    torch.manual_seed(0)
    B, L, gamma, lam = 3, 6, 0.9, 0.8
    r, v = torch.randn(B, L), torch.randn(B, L)
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    adv, _ = gae(r, v, mask, gamma, lam)
    for i in range(B):
        n = int(mask[i].sum())
        want, last = [0.0] * L, 0.0
        for t in reversed(range(n)):
            nv = float(v[i, t + 1]) if t + 1 < n else 0.0
            last = float(r[i, t]) + gamma * nv - float(v[i, t]) + gamma * lam * last
            want[t] = last
        torch.testing.assert_close(adv[i], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_value_loss_and_whiten_by_hand():
    # V = 1, V_old = 0.5, R = 2, ε = 0.2: clipped V = 0.7; ½ max(1², 1.3²) = 0.845
    got = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert got.item() == pytest.approx(0.845)
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_critic_is_policy_sized():
    """The critic is the policy's transformer without the parts it never uses (vocabulary head, MTP modules)
    plus a scalar value head: PPO's extra memory over GRPO, as grpo_vs_ppo.py reports it."""
    from nanoseek import ModelConfig, Transformer
    from nanoseek.policy import Policy

    model = Transformer(ModelConfig.preset("tiny", vocab_size=100))
    assert len(model.mtp) > 0  # the preset has MTP modules to leave out
    critic = Critic(Policy(model, 0, 2))
    n_policy = model.num_parameters()  # main model, MTP excluded
    n_head = model.lm_head.weight.numel()
    assert sum(p.numel() for p in critic.parameters()) == n_policy - n_head + critic.value_head.weight.numel() + 1


def test_trainer_step_fits_the_critic(tmp_path):
    from dataclasses import replace

    from nanoseek.policy import Policy
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.rl import RLTrainer

    model_dir = sft_checkpoint(tmp_path / "sft", steps=5)
    tok = Tokenizer.load(model_dir)
    policy = Policy.load(model_dir, tok.pad_id, tok.eos_id)
    cfg = PPOConfig(model=str(model_dir), task_kwargs=TASK, num_generations=2, prompts_per_step=4,
                    max_completion_length=3, lr=1e-3, critic_lr=1e-3, num_iterations=2)
    trainer = RLTrainer(cfg, policy, tok, PPO)
    critic: Critic = trainer.algorithm.critic
    before = {k: v.clone() for k, v in critic.state_dict().items()}

    def scripted(prompts, completions, **columns):  # half the completions rewarded: the critic has something to fit
        return [float(i % 2) for i in range(len(completions))]

    trainer.scorer = replace(trainer.scorer, reward_fns=[scripted], weights=[1.0])
    m, rollout = trainer.step(1)
    assert rollout.rewards.tolist() == [0.0, 1.0] * 4 and m["rewards/scripted/mean"] == 0.5
    assert m["value_loss"] > 0 and m["value_loss"] == m["value_loss"] and "kl" in m
    assert any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())
    assert not torch.equal(before["value_head.weight"], critic.value_head.weight)


def test_resume_is_exact_and_restores_the_critic(tmp_path):
    """4 PPO steps straight vs 2, a stop and 2 resumed (with --save-every): same rewards, losses, value losses and
    final policy; the checkpoint carries the critic and its optimizer; a GRPO checkpoint is refused clearly."""
    from nanoseek.checkpoint import latest_checkpoint
    from nanoseek.metrics import read_metrics
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.grpo import GRPOConfig, train_grpo
    from nanoseek.train.ppo import train_ppo

    model_dir = sft_checkpoint(tmp_path / "sft", steps=10)
    kw = dict(model=str(model_dir), task_kwargs=TASK, num_generations=2, prompts_per_step=4, max_completion_length=4,
              lr=1e-3, critic_lr=1e-3, num_iterations=2, progress=False)
    train_ppo(PPOConfig(out=str(tmp_path / "a"), steps=4, **kw))
    train_ppo(PPOConfig(out=str(tmp_path / "b"), steps=2, save_every=1, **kw))
    state = torch.load(latest_checkpoint(tmp_path / "b") / "state.pt", weights_only=False)
    assert {"critic", "critic_optimizer"} <= set(state) and state["step"] == 2
    train_ppo(PPOConfig(out=str(tmp_path / "b"), steps=4, resume=True, **kw))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["reward"] == mb["reward"]
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
        assert ma["value_loss"] == pytest.approx(mb["value_loss"], abs=1e-6)
    wa = Transformer.from_pretrained(tmp_path / "a" / "checkpoints" / "step_00000004").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "b" / "checkpoints" / "step_00000004").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    grpo_kw = {k: v for k, v in kw.items() if k != "critic_lr"}
    train_grpo(GRPOConfig(out=str(tmp_path / "g"), steps=1, **grpo_kw))
    with pytest.raises(ValueError, match="not a run of `nanoseek ppo`"):  # a GRPO run cannot become PPO
        train_ppo(PPOConfig(out=str(tmp_path / "g"), steps=2, resume=True, **kw))
