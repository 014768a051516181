"""GRPO advantages and losses against hand-computed values and against TRL's own GRPOTrainer._compute_loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nanoseek.train.losses import group_advantages, grpo_loss, process_advantages, soft_overlong_penalty

EPS = 1e-4


# ---------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / (std + EPS), -0.5 / (std + EPS), -0.5 / (std + EPS), 0.5 / (std + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(want), rtol=0, atol=1e-6)
    # Dr. GRPO: no std scaling
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    # batch std: std over all eight rewards
    bstd = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]).std().item()
    torch.testing.assert_close(group_advantages(r, 4, "batch"),
                               torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (bstd + EPS))
    # RLOO: baseline is the mean of the other three: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3
    torch.testing.assert_close(group_advantages(r, 4, "none", rloo=True),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))


def test_all_equal_groups_zero_advantage_no_nan():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    for scale in ("group", "batch", "none"):
        for rloo in (False, True):
            a = group_advantages(r, 3, scale, rloo)
            assert torch.equal(a[:3], torch.zeros(3)) and torch.equal(a[3:], torch.zeros(3))
    lp = torch.randn(6, 4, requires_grad=True)
    loss, _ = grpo_loss(lp, lp.detach(), group_advantages(r, 3), torch.ones(6, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(lp.grad).all() and lp.grad.abs().max() == 0


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "bogus")


def test_process_advantages_by_hand():
    # G = 2: output 0 has steps ending at tokens 1 and 3 (rewards 1, 0); output 1 one step ending at 2 (0.5).
    # R = [1, 0, 0.5]: mean 0.5, std 0.5 -> r~ = [1, -1, 0] (up to eps).
    # Â_{0,t} = Σ_{end >= t} r~: t0 = 1 - 1 = 0, t1 = 0, t2 = -1, t3 = -1; Â_1 = 0 everywhere.
    a = process_advantages([[1.0, 0.0], [0.5]], [[1, 3], [2]], 2, 4)
    n = 0.5 / (0.5 + EPS)
    torch.testing.assert_close(a, torch.tensor([[n - n, n - n, -n, -n], [0.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="outside the completion"):
        process_advantages([[1.0], [0.0]], [[4], [0]], 2, 4)


def test_soft_overlong_penalty_dapo_eq13():
    # L_max 10, buffer 4: 0 up to 6, then (6 - |y|)/4, -1 at 10
    got = soft_overlong_penalty(torch.tensor([3, 6, 7, 8, 10]), 10, 4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))


# ---------------------------------------------------------------------- loss, by hand
def _hand_inputs():
    # ratios: row 0 [1.5, 0.5, 1] with Â = +1; row 1 [1.5, 0.5, (pad)] with Â = -1
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_loss_variants_by_hand():
    logp, old, adv, mask = _hand_inputs()
    # ε = 0.2. Row 0: -min(1.5, 1.2) = -1.2, -min(.5, .8) = -.5, -1.  Row 1: -min(-1.5, -1.2) = 1.5,
    # -min(-.5, -.8) = .8.  Sums: -2.7 and 2.3 over 3 and 2 tokens.
    loss, st = grpo_loss(logp, old, adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx((-2.7 / 3 + 2.3 / 2) / 2)
    assert (st["clip_low"].item(), st["clip_high"].item(), st["tokens"].item()) == (1.0, 1.0, 5.0)
    for lt in ("dapo", "bnpo", "token-mean"):
        assert grpo_loss(logp, old, adv, mask, loss_type=lt)[0].item() == pytest.approx(-0.4 / 5)
    assert grpo_loss(logp, old, adv, mask, loss_type="dapo", num_items=10)[0].item() == pytest.approx(-0.4 / 10)
    assert grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)[0].item() == \
        pytest.approx(-0.4 / (2 * 4))
    # clip-higher ε_high = 0.3: row 0 token 0 becomes -1.3
    assert grpo_loss(logp, old, adv, mask, epsilon_high=0.3)[0].item() == pytest.approx((-2.8 / 3 + 2.3 / 2) / 2)
    # GSPO: row ratios exp(mean log-ratio) = 0.75^(1/3) and 0.75^(1/2), both inside [0.8, 1.2]? 0.9086, 0.8660: yes
    s0, s1 = 0.75 ** (1 / 3), 0.75**0.5
    got = grpo_loss(logp, old, adv, mask, importance_sampling_level="sequence")[0].item()
    assert got == pytest.approx((-s0 + s1) / 2, rel=1e-6)
    # k3 KL with ref − logp = log 2 on every token: 2 − log 2 − 1, β = 0.1, added per token then averaged
    ref = logp + math.log(2)
    k3 = 2 - math.log(2) - 1
    got, st = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    assert got.item() == pytest.approx((-2.7 / 3 + 2.3 / 2) / 2 + 0.1 * k3)
    assert st["kl"].item() == pytest.approx(5 * k3)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_mini_batch_loss(loss_type):
    """With the mini-batch's rows and tokens as normalizers, micro-batches of any sizes (each cut to its own
    longest completion) add up to the loss and gradient of the whole mini-batch."""
    torch.manual_seed(6)
    B, L = 5, 6
    old = torch.randn(B, L) - 2
    base = old + torch.randn(B, L) * 0.3
    adv, mask = torch.randn(B), torch.ones(B, L)
    mask[0, 2:] = 0
    mask[3, 4:] = 0
    kw = dict(loss_type=loss_type, max_completion_length=8)
    whole_lp, parts_lp = base.clone().requires_grad_(), base.clone().requires_grad_()
    whole, _ = grpo_loss(whole_lp, old, adv, mask, **kw)
    parts = sum(grpo_loss(parts_lp[rows, :w], old[rows, :w], adv[rows], mask[rows, :w], num_rows=B,
                          num_items=mask.sum(), **kw)[0]
                for rows, w in ((torch.tensor([0]), 2), (torch.tensor([3, 1]), 6), (torch.tensor([2, 4]), 6)))
    torch.testing.assert_close(parts, whole)
    whole.backward()
    parts.backward()
    torch.testing.assert_close(parts_lp.grad, whole_lp.grad)


def test_mu1_ratio_is_one_and_clipping_vanishes():
    torch.manual_seed(1)
    logp = (torch.randn(4, 5) - 2).requires_grad_()
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    loss, st = grpo_loss(logp, logp.detach(), adv, mask)
    assert st["clip_low"].item() == 0 and st["clip_high"].item() == 0
    # value: −mean_i Â_i (each row's token mean of −Â_i); gradient: −Â_i / |o_i| / B per token
    rows = mask.sum(1) > 0
    assert loss.item() == pytest.approx(float(-(adv * rows).sum() / 4), abs=1e-6)
    loss.backward()
    want = -(adv[:, None] * mask) / mask.sum(1, keepdim=True).clamp(min=1) / 4
    torch.testing.assert_close(logp.grad, want)


def test_loss_rejects_bad_switches():
    logp, old, adv, mask = _hand_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, adv, mask, loss_type="nope")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp, old, adv, mask, importance_sampling_level="word")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)


# ---------------------------------------------------------------------- loss == TRL's
def _trl_loss(logp, old, ref, adv, mask, *, loss_type, beta, eps_low, eps_high, level, max_len):
    """Call TRL's GRPOTrainer._compute_loss on an object carrying just the attributes it reads."""
    from trl import GRPOTrainer

    B, L = mask.shape

    class Accel:
        num_processes = 1

        def reduce(self, t, reduction="sum"):
            return t

        def gather(self, t):
            return t

        gather_for_metrics = gather

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=Accel(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, L, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["eval"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("level,beta,eps_high", [("token", 0.0, 0.2), ("token", 0.04, 0.28), ("sequence", 0.04, 0.2)])
def test_loss_matches_trl(loss_type, level, beta, eps_high):
    torch.manual_seed(2)
    B, L, max_len = 6, 7, 9
    old = torch.randn(B, L) * 0.5 - 2
    base = old + torch.randn(B, L) * 0.3  # ratios well outside [0.8, 1.2] on some tokens
    ref = old + torch.randn(B, L) * 0.2
    adv = torch.randn(B)
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ours_lp, trl_lp = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours, st = grpo_loss(ours_lp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                         loss_type=loss_type, importance_sampling_level=level, max_completion_length=max_len)
    theirs, metrics = _trl_loss(trl_lp, old, ref, adv, mask, loss_type=loss_type, beta=beta, eps_low=0.2,
                                eps_high=eps_high, level=level, max_len=max_len)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, rtol=1e-6, atol=1e-7)
    assert abs(ours.item()) > 1e-3  # a non-trivial case
    if level == "token":  # TRL weights its sequence-level clip statistics per sequence, ours per token
        assert st["clip_low"].item() / st["tokens"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0])
        assert st["clip_high"].item() / st["tokens"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0])
    if beta:
        assert st["kl"].item() / st["tokens"].item() == pytest.approx(metrics["kl"][0], rel=1e-6)


def test_process_supervision_token_advantages_match_trl():
    """Per-token advantages (B, L) from process_advantages go through the same loss as TRL's (B, T) path."""
    torch.manual_seed(3)
    B, L = 4, 5
    adv = process_advantages([[1.0, 0.0], [0.5], [0.2, 0.9, 0.1], [0.0]], [[1, 4], [2], [0, 1, 3], [4]], 2, L)
    old = torch.randn(B, L) - 2
    base = old + torch.randn(B, L) * 0.3
    mask = torch.ones(B, L)
    ours_lp, trl_lp = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours, _ = grpo_loss(ours_lp, old, adv, mask, loss_type="grpo")
    theirs, _ = _trl_loss(trl_lp, old, None, adv, mask, loss_type="grpo", beta=0.0, eps_low=0.2, eps_high=0.2,
                          level="token", max_len=L)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad)
