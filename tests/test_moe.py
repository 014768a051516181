import pytest
import torch
import torch.nn.functional as F
from builders import randomize_

from nanoseek import ModelConfig, Transformer
from nanoseek.model import moe as moe_module
from nanoseek.model.moe import Gate, MoE, RouterStats, sequence_balance_loss, update_expert_bias


def moe_config(**kw) -> ModelConfig:
    base = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                topk_group=1, routed_scaling_factor=2.0)
    return ModelConfig.preset("tiny", **{**base, **kw})


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token float64 reference: Σ_k g_k FFN_{e_k}(x) + shared(x)."""
    moe = moe.double()
    flat = x.double().reshape(-1, x.shape[-1])
    weights, ids, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    ex = moe.experts
    for n in range(flat.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[n, k]
            h = F.silu(ex.gate_proj[e] @ flat[n]) * (ex.up_proj[e] @ flat[n])
            out[n] += weights[n, k].double() * (ex.down_proj[e] @ h)
    out = out.view(x.shape)
    return out + moe.shared_experts(x.double())


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("kind", ["v3", "v2-group", "v2-greedy"])
def test_grouped_experts_match_per_token_reference(kind, grouped_mm, monkeypatch):
    if not grouped_mm:  # the per-expert loop used where torch has no grouped GEMM
        monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype: False)
    kw = {"v3": {}, "v2-group": dict(model_type="deepseek_v2", scoring_func="softmax",
                                     topk_method="group_limited_greedy"),
          "v2-greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy")}[kind]
    moe = MoE(moe_config(**kw))
    randomize_(moe, seed=0, scale=0.5, biases=False)
    x = torch.randn(3, 7, 16)
    stats = RouterStats()
    ours = moe(x, stats)
    assert stats.load[0].sum() == 3 * 7 * 2
    torch.testing.assert_close(ours.double(), reference_moe(moe, x), atol=1e-5, rtol=1e-5)
    ours.sum().backward()  # gradients reach every routed expert that got tokens
    hit = stats.load[0] > 0
    assert (moe.experts.gate_proj.grad.flatten(1).abs().sum(1) > 0).eq(hit).all()


def test_bias_changes_selection_not_gate_values():
    gate = Gate(moe_config(n_group=1, topk_group=1))
    randomize_(gate, seed=0, scale=0.5, biases=False)
    x = torch.randn(64, 16)
    w0, ids0, scores = gate(x)
    gate.e_score_correction_bias[5] = 10.0  # force expert 5 into every token's top-k
    w1, ids1, scores1 = gate(x)
    torch.testing.assert_close(scores, scores1)  # affinities untouched
    assert (ids1 == 5).any(dim=1).all()
    # gate values are the raw sigmoid affinities of the chosen experts, normalised, times the route scale
    expected = scores.gather(1, ids1)
    expected = expected / expected.sum(dim=1, keepdim=True) * 2.0
    torch.testing.assert_close(w1, expected)
    # and without the bias the same formula holds for the original choice
    torch.testing.assert_close(w0, scores.gather(1, ids0) / scores.gather(1, ids0).sum(1, keepdim=True) * 2.0)


def test_group_limited_routing_stays_in_chosen_groups():
    gate = Gate(moe_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3))
    randomize_(gate, seed=0, scale=0.5, biases=False)
    x = torch.randn(200, 16)
    _, ids, scores = gate(x)
    groups = scores.view(-1, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # (N, 2)
    chosen_groups = ids // 2
    assert (chosen_groups[..., None] == groups[:, None, :]).any(-1).all()


def test_bias_update_sign():
    gate = Gate(moe_config())
    load = torch.tensor([10.0, 0, 2, 2, 2, 2, 2, 4])  # expert 0 overloaded, expert 1 idle; mean 3
    update_expert_bias(gate, load, gamma=0.01)
    b = gate.e_score_correction_bias
    assert b[0] == pytest.approx(-0.01) and b[1] == pytest.approx(0.01) and b[7] == pytest.approx(-0.01)
    assert b[2] == pytest.approx(0.01)
    before = b.clone()
    update_expert_bias(gate, load, gamma=0.0)
    torch.testing.assert_close(gate.e_score_correction_bias, before)


def test_bias_update_is_outside_autograd():
    moe = MoE(moe_config())
    moe.train()
    moe(torch.randn(2, 5, 16)).sum().backward()
    assert not moe.gate.e_score_correction_bias.requires_grad
    assert moe.gate.e_score_correction_bias.grad is None


def test_sequence_balance_loss_hand_computed():
    # one sequence, T=2 tokens, E=3 experts, K=1
    scores = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]], dtype=torch.float64)
    # f_i = E/(K T) * count: expert0 chosen once, expert2 once -> f = [1.5, 0, 1.5]
    # P_i = mean_t s/sum(s) = [(0.6+0.2)/2, (0.3+0.2)/2, (0.1+0.6)/2] = [0.4, 0.25, 0.35]
    expected = 1.5 * 0.4 + 0 * 0.25 + 1.5 * 0.35
    assert sequence_balance_loss(scores, top_k=1).item() == pytest.approx(expected)


def test_router_stats_are_explicit(monkeypatch):
    """A forward without a RouterStats records nothing on the modules and computes no balance loss; with one,
    every MoE layer (the MTP module's included) reports its load, and the balance loss only when asked."""
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=1)).train()
    ids = torch.randint(0, 256, (2, 9))
    calls = []
    monkeypatch.setattr(moe_module, "sequence_balance_loss", lambda *a: calls.append(1) or torch.zeros(()))
    model(ids, return_mtp=True)
    assert not calls
    assert not any(hasattr(m, "last_load") or hasattr(m, "last_balance_loss") for m in model.moe_layers())
    stats = RouterStats()
    model(ids, return_mtp=True, router_stats=stats)
    assert not calls and not stats.balance_loss
    layers = [m.layer_idx for m in model.moe_layers()]
    assert list(stats.load) == layers == [1, 2]  # main layer 1 (layer 0 is dense), then the MTP block (L + 0)
    assert stats.load[1].sum() == 2 * 9 * 2 and stats.load[2].sum() == 2 * 8 * 2  # MTP sees T - 1 tokens
    stats = RouterStats(balance=True)
    model(ids, router_stats=stats)
    assert len(calls) == 1 and list(stats.balance_loss) == [1]


def test_grouped_mm_fallback_matches_grouped_mm(monkeypatch):
    """The per-expert loop (devices / dtypes without a grouped GEMM kernel) gives grouped_mm's output and grads."""
    assert moe_module.grouped_mm_supported(torch.device("cpu"), torch.float32)  # this machine takes grouped_mm
    moe = MoE(moe_config())
    randomize_(moe, seed=0, scale=0.5, biases=False)
    x = torch.randn(4, 11, 16, requires_grad=True)
    results = []
    for use in (True, False):
        monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype, use=use: use)
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone(), moe.experts.gate_proj.grad.clone(),
                        moe.experts.down_proj.grad.clone()])
    for grouped, loop in zip(*results):
        torch.testing.assert_close(loop, grouped, atol=1e-5, rtol=1e-5)


def test_grouped_mm_only_where_a_kernel_exists(monkeypatch):
    supported = moe_module.grouped_mm_supported
    assert supported(torch.device("cpu"), torch.bfloat16) and not supported(torch.device("cpu"), torch.float64)
    assert not supported(torch.device("meta"), torch.bfloat16) and not supported(torch.device("mps"), torch.float32)
    for capability, dtype, expected in [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True),
                                        ((8, 0), torch.bfloat16, False), ((9, 0), torch.float32, False),
                                        ((9, 0), torch.float16, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert supported(torch.device("cuda", 0), dtype) == expected, (capability, dtype)
