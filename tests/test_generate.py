"""generate(): greedy parity with transformers' generate, ragged batches, stop tokens, sampling filters and
log-probs, seeds, mode handling, MTP self-speculative decoding, and the `nanoseek generate` CLI."""

import json
import math

import pytest
import torch
from builders import randomize_
from test_parity_hf import make_config

from nanoseek import ModelConfig, Transformer, generate
from nanoseek.engine import SamplingParams, sample_rows
from nanoseek.generate import run_engine

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12], [7, 7, 30, 2]]




def random_model(case: str = "v3-qlora-groups-yarn", **overrides) -> Transformer:
    model = Transformer(make_config(case).replace(**overrides)).eval()
    randomize_(model)
    return model


@pytest.mark.parametrize("case", ["v3-qlora-groups-yarn", "v2-group-limited-yarn"])
def test_greedy_matches_transformers_generate(case, tmp_path):
    """Our batched ragged greedy decode == transformers' greedy generate run per prompt, token for token."""
    model = random_model(case)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    n = 10
    ours = generate(model, PROMPTS, n)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()
    assert len({tuple(o) for o in ours}) == len(ours) and all(len(set(o)) > 3 for o in ours)  # not degenerate


def test_naive_decode_generates_the_same():
    model = random_model()
    absorbed = generate(model, PROMPTS, 8)
    model.set_decode_impl("naive")
    assert generate(model, PROMPTS, 8) == absorbed


def test_stop_tokens_and_finished_rows_leave_the_batch():
    model = random_model()
    full = generate(model, PROMPTS, 9)
    stop = full[0][3]
    batch_sizes = []
    model.embed_tokens.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    got = generate(model, PROMPTS, 9, stop_token_ids=[stop])
    for row, g in zip(full, got):
        want = row[: row.index(stop) + 1] if stop in row else row  # stop token included, then nothing
        assert g == want
    assert batch_sizes[0] == 3 and batch_sizes[-1] < 3 and len(batch_sizes) == 9  # prefill + 8 decode steps
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_repeated_prompts_prefill_once():
    """A GRPO group's G copies of a prompt are prefilled as one row and decode exactly like distinct rows."""
    model = random_model()
    rows = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    shapes = []
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    got = generate(model, rows, 6)
    hook.remove()
    assert shapes[0][0] == 3 and shapes[1] == (6, 1)  # prefill over 3 distinct prompts, then 6 rows decode
    single = {tuple(p): generate(model, [p], 6)[0] for p in PROMPTS}
    assert got == [single[tuple(p)] for p in rows]


def test_sample_filters_and_logprobs_against_hand_computed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    T, top_k, top_p = 0.7, 4, 0.8
    p = (logits[0] / T).softmax(-1)
    keep = p >= p.sort(descending=True).values[top_k - 1]  # top-4: indices 5, 0, 1, 2
    p = torch.where(keep, p, 0) / p[keep].sum()
    order = p.argsort(descending=True)
    cum = p[order].cumsum(0) - p[order]
    nucleus = order[cum < top_p]  # smallest prefix whose mass reaches top_p
    want = torch.zeros(6)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    assert 1 < len(nucleus) < 4  # both filters bite
    g = torch.Generator().manual_seed(0)
    tokens, logps = map(torch.tensor, sample_rows(logits.expand(40000, 6),
                                                  [SamplingParams(temperature=T, top_k=top_k, top_p=top_p)] * 40000,
                                                  [g] * 40000))
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    torch.testing.assert_close(logps, want[tokens].log(), atol=1e-5, rtol=0)
    greedy, lp = map(torch.tensor, sample_rows(logits, [SamplingParams()], [None]))
    assert greedy.item() == 5 and math.isclose(lp.item(), logits[0].log_softmax(-1)[5].item(), rel_tol=1e-6)


def test_seeded_sampling_is_reproducible_and_filters_reduce_to_greedy():
    model = random_model()
    a = generate(model, PROMPTS, 8, temperature=1.0, seed=3)
    assert a == generate(model, PROMPTS, 8, temperature=1.0, seed=3)
    assert a != generate(model, PROMPTS, 8, temperature=1.0, seed=4)
    greedy = generate(model, PROMPTS, 8)
    assert generate(model, PROMPTS, 8, temperature=1.5, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, 8, temperature=1.5, top_p=1e-6, seed=1) == greedy
    tokens, logps = generate(model, PROMPTS, 8, temperature=0.9, top_k=20, seed=5, return_logprobs=True)
    assert tokens == generate(model, PROMPTS, 8, temperature=0.9, top_k=20, seed=5)
    # the returned log-probs are those of the filtered, tempered distribution: recompute from a full forward
    seq = torch.tensor([PROMPTS[0] + tokens[0]])
    with torch.no_grad():
        logits = model(seq)[0, len(PROMPTS[0]) - 1 : -1] / 0.9
    kth = logits.topk(20, dim=-1).values[:, -1:]
    ref = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1).gather(-1, torch.tensor(tokens[0])[:, None])
    torch.testing.assert_close(torch.tensor(logps[0]), ref[:, 0], atol=1e-4, rtol=0)


def test_mode_restored_and_inference_mode():
    model = random_model().train()
    seen = []
    model.layers[0].register_forward_hook(lambda m, a, o: seen.append((m.training, torch.is_inference_mode_enabled())))
    generate(model, PROMPTS, 3)
    assert model.training and seen and all(s == (False, True) for s in seen)
    model.eval()
    generate(model, PROMPTS, 2)
    assert not model.training


def test_bad_input_is_named():
    model = random_model()
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match=r"prompt 0: the prompt has token ids outside \[0, 97\)"):
        generate(model, [[1, 97]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        generate(model, [[1]], 3, speculative=True)


def test_speculative_accepts_every_draft_when_it_is_right():
    """Zeroed final norms give all-zero logits: main and MTP both predict token 0, so every draft is accepted and
    each main-model step yields two tokens (prefill gives the first)."""
    model = random_model(num_nextn_predict_layers=1)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.mtp[0].norm.weight.zero_()
    steps = []
    model.layers[0].register_forward_hook(lambda m, a, o: steps.append(1))
    requests, engine = run_engine(model, [[3, 4], [5]], 9, speculative=True)
    assert [r.output_ids for r in requests] == [[0] * 9, [0] * 9] and engine.spec_accepted == engine.spec_proposed
    assert len(steps) == 1 + 4  # prefill, then 4 verify steps of 2 tokens


def test_cli_generate(tmp_path, capsys):
    from nanoseek.cli import main
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.char()
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, initializer_range=0.3)).eval()
    model.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--ids", "--prompt", "5 6 7",
                 "--max-completion-length", "4"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in generate(model, [[5, 6, 7]], 4)[0]]
    assert main(["generate", "--model", str(tmp_path), "--prompt", "12+3="]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    tok.save(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "12+3=", "--max-completion-length", "6"]) == 0
    ids = tok.encode("12+3=", add_bos=True)
    assert capsys.readouterr().out == tok.decode(generate(model, [ids], 6, stop_token_ids=[tok.eos_id])[0]) + "\n"


def test_mha_baseline_generate_matches_uncached_greedy():
    """The MHA/GQA baseline through the same cache: batched greedy == argmax of full uncached forwards."""
    model = random_model(attention_type="mha", head_dim=12, num_key_value_heads=2)
    got = generate(model, PROMPTS, 6)
    for prompt, out in zip(PROMPTS, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt):]


def test_checkpoint_carries_the_tokenizers_ids_so_generate_stops_at_eos(tmp_path):
    """A checkpoint saved with its tokenizer names bos/eos/pad in config.json: transformers' generate and ours, given
    no stop ids, end at EOS. The model is a random one with token ids permuted so that greedy decoding emits EOS."""
    from nanoseek.checkpoint import save_checkpoint
    from nanoseek.tokenizer import Tokenizer

    tok, prompt, n = Tokenizer.char(), [1, 40, 50, 60], 8
    model = random_model("v3-qlora-groups-yarn", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
    free = generate(model, [prompt], n)[0]
    t = next(t for t in free[2:] if t not in (*prompt, tok.eos_id))  # becomes EOS, the ids swapped everywhere
    with torch.no_grad():
        for w in (model.embed_tokens.weight, model.lm_head.weight):
            w[[t, tok.eos_id]] = w[[tok.eos_id, t]]
    want = [tok.eos_id if x == t else t if x == tok.eos_id else x for x in free][:free.index(t) + 1]
    assert generate(model, [prompt], n, stop_token_ids=[])[0][:len(want)] == want and len(want) < n
    path = save_checkpoint(tmp_path, 1, model, tokenizer=tok)
    config = json.loads((path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id, 0)
    assert generate(Transformer.from_pretrained(path), [prompt], n)[0] == want
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist() == want


def test_cli_generate_defaults_to_the_room_left_in_the_context(tmp_path, capsys):
    """On a 64-token model of a run directory, the default output length is what the context leaves; an explicit one
    that does not fit is refused naming the flag and the room; several outputs are separated."""
    from nanoseek.checkpoint import save_checkpoint
    from nanoseek.cli import main
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.char()
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, max_position_embeddings=64, initializer_range=0.3))
    save_checkpoint(tmp_path, 3, model.eval(), tokenizer=tok)
    prompt = tok.encode("4,5,7:8=", add_bos=True)  # 9 tokens: room for 55
    assert main(["generate", "--model", str(tmp_path), "--prompt", "4,5,7:8="]) == 0
    assert capsys.readouterr().out == tok.decode(generate(model, [prompt], 55, stop_token_ids=[tok.eos_id])[0]) + "\n"
    assert main(["generate", "--model", str(tmp_path), "--prompt", "4,5,7:8=", "--max-completion-length", "56"]) == 2
    assert ("9 tokens leave room for 55 new tokens in the model's context of 64; lower --max-completion-length 56"
            in capsys.readouterr().err)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "1" * 70]) == 2
    assert "71 tokens leave room for 0 new tokens in the model's context of 64; shorten the prompt" in (
        capsys.readouterr().err)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "1", "--prompt", "2", "--ids",
                 "--max-completion-length", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- 1" and lines[2] == "--- 2" and len(lines) == 4
