"""MTP speculative decoding in the engine: greedy output identical to plain greedy (batched, ragged, stop tokens,
D = 1 and 2), acceptance counted per depth, and sampled outputs distributed exactly as plain sampling (χ² against
the model's own probabilities in float64; the test rejects a wrong acceptance rule)."""

import copy

import pytest
import torch
from builders import randomize_
from test_parity_hf import make_config

from nanoseek import Transformer
from nanoseek.engine import Engine, SamplingParams, slots_for_budget
from nanoseek.engine import engine as engine_module
from nanoseek.engine.sampling import log_probs
from nanoseek.generate import generate, run_engine

PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [8, 0, 3], [7], [2, 2]]


def random_model(depth: int, case: str = "v3-qlora-groups-yarn", vocab_size: int = 9) -> Transformer:
    model = Transformer(make_config(case).replace(num_nextn_predict_layers=depth, vocab_size=vocab_size)).eval()
    randomize_(model)
    return model


def agreeing_model(depth: int) -> Transformer:
    """Every block's output projections zeroed: the main model predicts from the last token alone,
    lm_head(norm(Emb(t))), and each MTP module (M_k = [I 0], its norm the main one) computes the same from
    Emb(t_{i+k}): every draft is the main model's own prediction."""
    model = random_model(depth)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                p.zero_()
        D = model.config.hidden_size
        for m in model.mtp:
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :D] = torch.eye(D)
            m.enorm.weight.fill_(1.0)
            m.norm.weight.copy_(model.norm.weight)
    return model


@pytest.mark.parametrize(("depth", "case"), [(1, "v3-qlora-groups-yarn"), (2, "v3-qlora-groups-yarn"),
                                             (1, "v2-lite-greedy"), (2, "v2-lite-greedy")])
def test_greedy_equals_plain_greedy(depth, case):
    model = random_model(depth, case)
    plain = generate(model, PROMPTS, 14)
    requests, engine = run_engine(model, PROMPTS, 14, speculative=True)
    assert [r.output_ids for r in requests] == plain
    assert engine.spec_proposed == [engine.spec_proposed[0]] * depth and engine.spec_proposed[0] > 0
    assert 0 < engine.spec_accepted[0] < engine.spec_proposed[0]  # both the accept and the reject branch ran
    assert all(a >= b for a, b in zip(engine.spec_accepted, engine.spec_accepted[1:]))
    stop = plain[1][5]
    assert generate(model, PROMPTS, 14, stop_token_ids=[stop], speculative=True) == generate(
        model, PROMPTS, 14, stop_token_ids=[stop])
    for n in (1, 2, 5):
        assert generate(model, PROMPTS, n, speculative=True) == generate(model, PROMPTS, n)


def test_continuous_batching_chunked_prefill_and_cache_bounds():
    """Requests joining mid-run, prompts prefilled in chunks, and max_len exactly prompt + max_tokens."""
    model = random_model(2)
    plain = generate(model, PROMPTS, 9)
    engine = Engine(model, num_slots=2, max_len=15, prefill_tokens=3, speculative=True)
    requests = [engine.add(p, SamplingParams(max_tokens=9)) for p in PROMPTS]
    engine.run()
    assert [r.output_ids for r in requests] == plain
    assert int(engine.caches[1].lengths.max()) <= 15 + 2


def test_mixed_batch_greedy_rows_unchanged_and_seeded_rows_independent_of_the_batch():
    model = random_model(2)
    sampled = SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=7)
    engine = Engine(model, 4, 20, speculative=True)
    requests = [engine.add(p, SamplingParams(max_tokens=9) if i % 2 else sampled) for i, p in enumerate(PROMPTS[:4])]
    engine.run()
    alone = Engine(model, 1, 20, speculative=True)
    seeded = alone.add(PROMPTS[0], sampled)
    alone.run()
    assert requests[0].output_ids == seeded.output_ids
    assert [requests[1].output_ids, requests[3].output_ids] == generate(model, [PROMPTS[1], PROMPTS[3]], 9)


def test_budget_counts_the_mtp_cache_and_drafts():
    model = random_model(2)
    engine = Engine(model, 3, 40, speculative=True)
    used = sum(c.nbytes for c in engine.caches) + engine.draft_probs.nbytes
    assert slots_for_budget(model, used, 40, speculative=True) == 3
    assert slots_for_budget(model, used - 1, 40, speculative=True) == 2


@pytest.mark.parametrize("depth", [1, 2])
def test_agreeing_heads_accept_every_draft(depth):
    model = agreeing_model(depth)
    steps = []
    model.layers[0].register_forward_hook(lambda m, a, o: steps.append(1))
    requests, engine = run_engine(model, [[3, 4], [5]], 10, speculative=True)
    assert len(steps) == 1 + -(-9 // (depth + 1))  # prefill, then D + 1 tokens per verify
    assert [r.output_ids for r in requests] == generate(model, [[3, 4], [5]], 10)
    assert engine.spec_accepted == engine.spec_proposed
    _, sampled = run_engine(model, [[3, 4]] * 8, 10, temperature=1.0, seed=0, speculative=True)
    assert sampled.spec_accepted[-1] > 0.9 * sampled.spec_proposed[-1]  # p = q: (almost) always accepted


def test_speculative_needs_mtp():
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        generate(random_model(0), [[1]], 3, speculative=True)


# ---------------------------------------------------------------------- the sampling distribution
V, N, TEMP, TOP_K = 6, 3000, 1.3, 5


def _exact(model: Transformer, prompt: list[int]) -> torch.Tensor:
    """(V, V, V) probabilities of the first three tokens, from the model in float64 with the sampling filters."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        seqs = torch.cartesian_prod(*[torch.arange(V)] * 2)
        p1 = log_probs(model(torch.tensor([prompt]))[0, -1].double(), TEMP, TOP_K).exp()
        p2 = log_probs(model(torch.cat((torch.tensor([prompt] * V), torch.arange(V)[:, None]), 1))[:, -1], TEMP,
                       TOP_K).exp()
        p3 = log_probs(model(torch.cat((torch.tensor([prompt] * V * V), seqs), 1))[:, -1], TEMP, TOP_K).exp()
    return p1[:, None, None] * p2[:, :, None] * p3.view(V, V, V)


def _p_value(samples: list[list[int]], probs: torch.Tensor) -> float:
    """χ² goodness of fit of the first-three-token triples, cells expecting < 5 merged into one."""
    counts = torch.zeros(V**3, dtype=torch.float64)
    for s in samples:
        counts[s[0] * V * V + s[1] * V + s[2]] += 1
    expected = probs.flatten() * len(samples)
    small = expected < 5
    obs = torch.cat((counts[~small], counts[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), stat / 2))


@pytest.fixture(scope="module")
def sampling_model():
    model = random_model(2, vocab_size=V)
    return model, _exact(model, [1, 2])


def _sample(model: Transformer, seed: int) -> list[list[int]]:
    return generate(model, [[1, 2]] * N, 3, temperature=TEMP, top_k=TOP_K, seed=seed, speculative=True)


def test_sampled_tokens_follow_the_target_distribution(sampling_model):
    model, probs = sampling_model
    assert _p_value(generate(model, [[1, 2]] * N, 3, temperature=TEMP, top_k=TOP_K, seed=0), probs) > 1e-3
    requests, engine = run_engine(model, [[1, 2]] * N, 3, temperature=TEMP, top_k=TOP_K, seed=1, speculative=True)
    assert _p_value([r.output_ids for r in requests], probs) > 1e-3
    assert 0 < engine.spec_accepted[0] < engine.spec_proposed[0]  # drafts both accepted and rejected


@pytest.mark.parametrize("wrong", ["accept every draft", "resample from p"])
def test_a_wrong_acceptance_rule_fails_the_test(sampling_model, monkeypatch, wrong):
    model, probs = sampling_model
    right = engine_module.verify

    def verify(p, q, drafts, u):
        if wrong == "accept every draft":
            return right(p, q, drafts, torch.zeros_like(u) - 1)  # u < 0: every ratio passes
        n, _ = right(p, q, drafts, u)
        return n, p[torch.arange(len(n)), n]  # on rejection, p instead of norm(max(0, p - q))

    monkeypatch.setattr(engine_module, "verify", verify)
    assert _p_value(_sample(model, 1), probs) < 1e-3


def test_cli_generate_speculative(tmp_path, capsys):
    from nanoseek.cli import main

    model = random_model(1)
    model.save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--ids", "--prompt", "5 6 7", "--prompt", "1",
            "--max-completion-length", "6"]
    assert main(argv + ["--speculative"]) == 0
    captured = capsys.readouterr()
    plain = generate(model, [[5, 6, 7], [1]], 6)
    assert captured.out.splitlines() == ["--- 1", " ".join(map(str, plain[0])), "--- 2", " ".join(map(str, plain[1]))]
    assert "MTP draft acceptance: depth 1" in captured.err
