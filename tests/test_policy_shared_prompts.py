"""Prompt sharing in the log-prob passes: the G completions of a group run their prompt once (nanoseek's latent
cache or a Hugging Face model's own cache, copied per row); log-probs and gradients equal the per-row forward."""

import pytest
import torch
from test_grpo import reference_logprobs, tiny_llama, tiny_nanoseek

from nanoseek.policy import Batch, Policy, _prompt_groups


def grouped_batch(G: int = 3, width: int = 6) -> Batch:
    """3 prompts of different lengths x G ragged completions (lengths 1..width), grouped contiguously."""
    torch.manual_seed(1)
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]
    rows = [p for p in prompts for _ in range(G)]
    completions = [torch.randint(4, 100, (1 + (i * 5) % width,)).tolist() for i in range(len(rows))]
    return Batch.build(rows, completions, pad_id=0, width=width)


def test_prompt_groups():
    batch = grouped_batch()
    first, row_to_prompt = _prompt_groups(batch)
    assert first.tolist() == [0, 3, 6] and row_to_prompt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert _prompt_groups(batch.select(torch.tensor([0, 3, 6]))) is None  # all distinct: nothing to share
    # same tokens but a different length is a different prompt
    b = Batch.build([[1, 5], [1, 5, 6], [1, 5]], [[7], [8], [9]], pad_id=0)
    assert _prompt_groups(b)[1].tolist() == [0, 1, 0]


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
        logp, ent = Policy(model, 0, 2, share_prompts=share).completion_logprobs(batch, temperature=0.7,
                                                                                  entropy=True)
        w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2)) * batch.completion_mask
        (logp * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logp.detach(), ent, grads, sum(tokens_seen))
    hook.remove()
    (lp0, ent0, g0, n0), (lp1, ent1, g1, n1) = results[False], results[True]
    assert n1 < n0  # the shared path really ran fewer tokens (3 prompts, not 9)
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
    with torch.no_grad():
        logp, _ = Policy(model, 0, 2).completion_logprobs(batch)
    assert calls == [batch.input_ids.shape]  # one unshared pass over every row
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
