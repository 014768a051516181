"""Prompt sharing in the log-prob passes: the G completions of a group run their prompt once (nanoseek's latent
cache or a Hugging Face model's own cache, copied per row); log-probs and gradients equal the per-row forward."""

import pytest
import torch
from builders import batch_from_rows
from test_grpo import reference_logprobs, tiny_llama, tiny_nanoseek

from nanoseek.policy import Batch, Policy

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]


def grouped_batch(G: int = 3, width: int = 6) -> Batch:
    """3 prompts of different lengths x G ragged completions (lengths 1..width), grouped contiguously."""
    torch.manual_seed(1)
    completions = [torch.randint(4, 100, (1 + (i * 5) % width,)).tolist() for i in range(len(PROMPTS) * G)]
    return Batch.build(PROMPTS, [p for p in range(len(PROMPTS)) for _ in range(G)], completions, pad_id=0)


def test_batch_from_rows_groups_identical_prompts():
    batch = grouped_batch()
    completions = [c[:n] for c, n in zip(batch.completion_ids.tolist(), batch.completion_lens.tolist())]
    rows = batch_from_rows([p for p in PROMPTS for _ in range(3)], completions, pad_id=0)
    assert rows.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rows.prompt_lens.tolist() == [5, 2, 3] and torch.equal(rows.prompt_ids, batch.prompt_ids)
    assert torch.equal(rows.sequences(0), batch.sequences(0))
    assert rows.sequences(0)[3].tolist() == [1, 9] + completions[3] + [0] * (11 - 2 - len(completions[3]))
    # same tokens but a different length is a different prompt (also when the extra token is the pad id)
    b = batch_from_rows([[1, 5], [1, 5, 6], [1, 5], [1, 5, 0]], [[7], [8], [9], [10]], pad_id=0)
    assert b.prompt_index.tolist() == [0, 1, 0, 2] and b.prompt_lens.tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match="3 completions but 2 prompt indices"):
        Batch.build([[1]], [0, 0], [[2], [3], [4]], pad_id=0)


def test_shares_exactly_when_a_prompt_repeats():
    batch = grouped_batch()
    policy = Policy(tiny_nanoseek(), 0, 2)
    assert policy.shares(batch)
    assert not policy.shares(batch.select(torch.tensor([0, 3, 6])))  # all distinct: nothing to share
    assert policy.shares(batch.select(torch.tensor([0, 3, 4])))  # prompt 1 twice
    assert not Policy(policy.model, 0, 2, share_prompts=False).shares(batch)
    assert Policy(tiny_llama(), 0, 2).shares(batch)  # a Hugging Face decoder that continues a cache
    # the shared pass processes each distinct prompt once: fewer tokens, fewer of them padding
    (shared, shared_real), (per_row, per_row_real) = batch.token_counts(True), batch.token_counts(False)
    completions = int(batch.completion_mask.sum())
    assert shared_real == 5 + 2 + 3 + completions and per_row_real == 3 * (5 + 2 + 3) + completions
    assert shared == 3 * 5 + 9 * 6 and per_row == 9 * int(batch.sequences(0).shape[1]) and shared < per_row


@pytest.mark.parametrize("kind", ["nanoseek", "llama"])
@pytest.mark.parametrize("width", [6, 1])
def test_shared_prompt_logprobs_and_grads_equal_per_row(kind, width):
    torch.manual_seed(0)
    model = tiny_nanoseek() if kind == "nanoseek" else tiny_llama()
    batch = grouped_batch(width=width)
    tokens_seen = []
    hook = (model if kind == "nanoseek" else model.get_decoder()).register_forward_pre_hook(
        lambda mod, args, kwargs: tokens_seen.append((args[0] if args else kwargs["input_ids"]).numel()),
        with_kwargs=True)
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        tokens_seen.clear()
        policy = Policy(model, 0, 2, share_prompts=share)
        assert policy.shares(batch) == share
        logp, ent = policy.completion_logprobs(batch, temperature=0.7, entropy=True)
        w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2)) * batch.completion_mask
        (logp * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logp.detach(), ent, grads, sum(tokens_seen))
    hook.remove()
    (lp0, ent0, g0, n0), (lp1, ent1, g1, n1) = results[False], results[True]
    # the shared path really ran fewer tokens (3 prompts, not 9): the prompts once, then every completion token
    # but the last (the cost model counts that one too)
    assert n1 < n0 and n0 == batch.token_counts(False)[0]
    assert n1 == batch.token_counts(True)[0] - len(batch)
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp1, reference_logprobs(model, batch, temperature=0.7).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    assert (lp1[batch.completion_mask == 0] == 0).all()
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:  # float32 sums in another order: absolute error relative to the tensor's gradient scale
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * max(1.0, g0[n].abs().max().item()))


def test_hf_decoder_without_a_cache_runs_rows_separately():
    """A Hugging Face decoder whose forward takes neither position ids nor a cache is not shared (same values)."""
    model = tiny_llama()
    batch = grouped_batch()
    with torch.no_grad():
        want = reference_logprobs(model, batch)
    decoder = model.get_decoder()
    full_forward = decoder.forward
    calls = []

    def forward(input_ids):  # the narrow signature some custom models have
        calls.append(input_ids.shape)
        return full_forward(input_ids=input_ids)

    decoder.forward = forward
    policy = Policy(model, 0, 2)
    assert not policy.shares(batch)  # prompts repeat, but this backend cannot continue a cache
    with torch.no_grad():
        logp, _ = policy.completion_logprobs(batch)
    assert calls == [batch.sequences(0).shape]  # one unshared pass over every row
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
