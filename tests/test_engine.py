"""The continuous-batching engine: equal to generate() under chunked prefill, queueing and mixed batches; seeded
requests independent of their batch; cancellation frees space; incremental detokenization and stop strings."""

import pytest
import torch
from test_generate import PROMPTS, random_model

from nanoseek import generate
from nanoseek.engine import Detokenizer, Engine, SamplingParams, bytes_per_token, slots_for_budget
from nanoseek.tokenizer import Tokenizer

UTF8_TEXT = "naïve café — 日本語のテキスト, emoji 🙂🚀 and ascii words, Ünïcödé façade, 中文字符 ✓ ∑ ≠ ∞.\n" * 20


def run_all(engine, prompts, params, **kw):
    requests = [engine.add(p, params, **kw) for p in prompts]
    engine.run()
    return requests


@pytest.mark.parametrize("attention_type", ["mla", "mha"])
def test_chunked_prefill_and_few_slots_equal_generate(attention_type):
    """2 slots for 5 requests, prompts prefilled 3 tokens per step while others decode: same tokens as generate()."""
    extra = dict(attention_type="mha", head_dim=12, num_key_value_heads=2) if attention_type == "mha" else {}
    model = random_model(**extra)
    prompts = PROMPTS + [[4, 4, 8, 1, 9, 9, 2, 50, 3], [11, 3]]
    want = generate(model, prompts, 7)
    engine = Engine(model, num_slots=2, max_len=20, prefill_tokens=3)
    steps, widths = 0, []
    model.embed_tokens.register_forward_hook(lambda m, a, o: widths.append(a[0].shape))
    requests = [engine.add(p, SamplingParams(max_tokens=7)) for p in prompts]
    while engine.has_work():
        engine.step()
        steps += 1
        assert engine.slots_used <= 2
    assert [r.output_ids for r in requests] == want
    assert all(r.finish_reason == "length" for r in requests)
    assert max(w[1] for w in widths) == 3 and max(w[0] for w in widths) == 2  # chunks of 3, batches of 2


def test_seeded_request_is_independent_of_its_batch():
    model = random_model()
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    alone = run_all(Engine(model, 4, 24), [PROMPTS[0]], params)[0].output_ids
    engine = Engine(model, 4, 24)
    others = [engine.add(p, SamplingParams(max_tokens=5, temperature=1.2, seed=s)) for s, p in enumerate(PROMPTS)]
    mine = engine.add(PROMPTS[0], params)
    engine.run()
    assert mine.output_ids == alone
    assert others[0].output_ids != alone[:5]  # a different seed samples differently (not a greedy model)


def test_identical_prompts_are_prefilled_once():
    model = random_model()
    shapes = []
    model.embed_tokens.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    engine = Engine(model, 6, 20)
    params = SamplingParams(max_tokens=4, temperature=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    requests = [engine.add(PROMPTS[0], params, generator=g) for g in gens]
    engine.run()
    assert shapes[0] == (1, len(PROMPTS[0])) and shapes[1] == (6, 1)
    for g, r in zip(range(6), requests):  # each equals the same request run alone with its generator
        alone = run_all(Engine(model, 1, 20), [PROMPTS[0]], params, generator=torch.Generator().manual_seed(g))
        assert r.output_ids == alone[0].output_ids


def test_cancel_frees_the_slot_at_the_next_step():
    model = random_model()
    engine = Engine(model, 1, 40)
    first = engine.add(PROMPTS[0], SamplingParams(max_tokens=30))
    second = engine.add(PROMPTS[1], SamplingParams(max_tokens=3))
    engine.step()
    engine.step()
    assert engine.slots_used == 1 and len(first.output_ids) == 3 and not second.output_ids  # prefill + 2 decodes
    first.cancelled = True
    engine.run()
    assert first.finish_reason == "cancelled" and len(first.output_ids) == 3
    assert second.output_ids == generate(model, [PROMPTS[1]], 3)[0] and engine.slots_used == 0


def test_budget_sets_the_slots():
    model = random_model()
    per_token = bytes_per_token(model)
    c = model.config
    assert per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4
    assert slots_for_budget(model, per_token * 100 * 3 + 5, 100) == 3
    engine = Engine(model, 3, 100)
    assert engine.cache.nbytes == per_token * 100 * 3
    with pytest.raises(ValueError, match="maximum context length is 100 tokens"):
        engine.add([1] * 90, SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe([UTF8_TEXT], vocab_size=300, min_frequency=1)


def test_incremental_detokenization_never_breaks_characters(bpe):
    ids = bpe.encode(UTF8_TEXT[:400])
    pieces = [bpe.tok.id_to_token(i) for i in ids]
    assert any(len(p) == 1 and ord(p) > 255 for p in pieces)  # some tokens are single bytes of a character
    rng = torch.Generator().manual_seed(0)
    random_ids = torch.randint(4, bpe.vocab_size, (300,), generator=rng).tolist()  # what an untrained model emits
    for seq in (ids, random_ids):
        d = Detokenizer(bpe.decode)
        deltas = [d.add(t) for t in seq] + [d.flush()]
        assert "".join(deltas) == bpe.decode(seq)
    d = Detokenizer(bpe.decode)
    deltas = [d.add(t) for t in ids]
    assert all("\ufffd" not in x for x in deltas) and "".join(deltas) + d.flush() == UTF8_TEXT[:400]


def test_stop_strings_cut_the_text_and_stream_the_same(bpe):
    model = random_model(vocab_size=bpe.vocab_size)
    prompt = bpe.encode("café")
    plain = run_all(Engine(model, 1, 60, decode=bpe.decode), [prompt], SamplingParams(max_tokens=40),
                    want_text=True)[0]
    assert plain.text == bpe.decode(plain.output_ids)
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 2]
    streamed = []
    engine = Engine(model, 1, 60, decode=bpe.decode)
    r = engine.add(prompt, SamplingParams(max_tokens=40, stop=(stop,)), want_text=True,
                   on_output=lambda req, text: streamed.append(text))
    engine.run()
    assert r.finish_reason == "stop" and r.text == plain.text[: plain.text.index(stop)]
    assert "".join(streamed) == r.text and len(r.output_ids) < 40
