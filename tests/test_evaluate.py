"""evaluate() on a built-in task's rows: greedy accuracy, pass@k and maj@k against hand-computed values (scripted
generations), and the greedy path against a plain argmax decode of the model."""

import importlib

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.datasets import Row
from nanoseek.evaluate import evaluate as evaluate_rows
from nanoseek.policy import Policy
from nanoseek.rollout import Scorer
from nanoseek.tasks import Example, examples, get_task, task_reward
from nanoseek.tokenizer import Tokenizer

TOK = Tokenizer.char()
TASK = get_task("countdown")


def rows_of(exs: list[Example]) -> list[Row]:
    return [Row(ex.prompt, ex.completion, {"answer": ex.answer, "example": ex}) for ex in exs]


def evaluate(model, tok, exs, task, **kwargs):
    """``evaluate`` of a tiny policy on a task's rows (its model only runs where ``generate`` is not scripted)."""
    torch.manual_seed(0)
    model = model or Transformer(ModelConfig.preset("tiny", vocab_size=TOK.vocab_size))
    return evaluate_rows(Policy(model, tok.pad_id, tok.eos_id), tok.encode_prompt, tok.decode, rows_of(exs),
                         Scorer([task_reward(task)], tokenizer=tok), **kwargs)


def _scripted(monkeypatch, greedy: dict[str, str], samples: dict[str, list[str]]):
    """Replace generate: greedy -> greedy[prompt]; sampling -> samples[prompt] in order, per call."""
    served: dict[str, int] = {}

    def fake(model, prompts, max_new_tokens, temperature=0.0, stop_token_ids=(), seed=None, return_logprobs=False,
             **kw):
        outs = []
        for ids in prompts:
            p = TOK.decode(ids)
            if temperature == 0:
                text = greedy[p]
            else:
                text = samples[p][served.get(p, 0)]
                served[p] = served.get(p, 0) + 1
            outs.append(TOK.encode(text) + [TOK.eos_id] + TOK.encode("junk after eos"))
        return (outs, [[0.0] * len(o) for o in outs]) if return_logprobs else outs

    monkeypatch.setattr(importlib.import_module("nanoseek.generate"), "generate", fake)


def test_metrics_match_hand_computed_values(monkeypatch):
    exs = [Example("3,5,7:26=", "3*7+5", "26"), Example("1,2,3:6=", "1+2+3", "6"), Example("2,4,9:1=", "9-2*4", "1")]
    greedy = {"3,5,7:26=": "5+3*7", "1,2,3:6=": "1*2+3", "2,4,9:1=": "9-2*4"}  # right, wrong, right -> 2/3
    samples = {
        "3,5,7:26=": ["5+7*3", "3*7+5", "1+1", "1+1"],  # 2 right; majority "1+1" (2 votes, first at index 2) wrong
        "1,2,3:6=": ["1*2*3", "3+2+1", "1+2+3", "1*2*3"],  # all right; majority "1*2*3" right
        "2,4,9:1=": ["9-4-2", "9", "2+4", "9-4-2"],  # none right ("9-4-2" = 3)
    }
    _scripted(monkeypatch, greedy, samples)
    r = evaluate(None, TOK, exs, TASK, k=4, max_completion_length=8)
    assert r["n"] == 3
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["pass@4"] == pytest.approx(2 / 3)
    assert r["maj@4"] == pytest.approx(1 / 3)
    assert r["sample_accuracy"] == pytest.approx(6 / 12)
    assert [c["completion"] for c in r["greedy_completions"]] == ["5+3*7", "1*2+3", "9-2*4"]
    assert r["greedy_correct"] == [1.0, 0.0, 1.0]  # per problem, in order: what paired comparisons use
    assert r["sample_correct"] == [0.5, 1.0, 0.0]


def test_majority_tie_goes_to_the_earliest_answer(monkeypatch):
    ex = [Example("1,2,3:6=", "1+2+3", "6")]
    _scripted(monkeypatch, {"1,2,3:6=": "x"}, {"1,2,3:6=": ["1+2+3", "9", "9", "1*2*3", "1+2+3", "x"]})
    r = evaluate(None, TOK, ex, TASK, k=6)
    assert r["maj@6"] == 1.0  # "1+2+3" and "9" tie with 2 votes; "1+2+3" came first
    assert r["accuracy"] == 0.0 and r["pass@6"] == 1.0


def test_majority_votes_on_the_final_answer(monkeypatch):
    """GSM8K-style samples: different worked solutions reaching #### 6 vote together."""
    gsm = get_task("gsm8k")
    ex = [Example("Tom has 5 pens, buys 3 more and gives away 2. How many does he have now?", "", "6")]
    samples = ["5+3=9\n#### 7", "5+3=8\n8-2=6\n#### 6", "3+5=8\n8-2=6\n#### 6", "8-2=6\n#### 6",
               "5+3=9\n#### 7"]  # by first line "5+3=9" would win with 2 votes; by final answer 6 wins with 3
    _scripted(monkeypatch, {ex[0].prompt: "#### 1"}, {ex[0].prompt: samples})
    r = evaluate(None, TOK, ex, gsm, k=5, max_completion_length=32)
    assert r["maj@5"] == 1.0 and r["sample_accuracy"] == pytest.approx(3 / 5)


def test_greedy_matches_a_plain_argmax_decode():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=TOK.vocab_size)).eval()
    exs = examples(TASK, 6, "eval", seed=3)
    r = evaluate(model, TOK, exs, TASK, k=0, max_completion_length=5, batch_size=4)
    for ex, got in zip(exs, r["greedy_completions"]):
        ids = TOK.encode(ex.prompt, add_bos=True)
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                new.append(nxt)
                if nxt == TOK.eos_id:
                    break
        want = TOK.decode(new[: new.index(TOK.eos_id)] if TOK.eos_id in new else new)
        assert got["completion"] == want
    assert "pass@0" not in r and r["accuracy"] == 0.0  # a random model solves nothing


def test_bad_arguments():
    with pytest.raises(ValueError, match="no examples"):
        evaluate(None, TOK, [], TASK)
    with pytest.raises(ValueError, match="temperature"):
        evaluate(None, TOK, [Example("1,2:3=", "1+2", "3")], TASK, temperature=0.0)


def test_cli_counts_distinct_problems_and_says_when_the_split_is_smaller(tmp_path, capsys):
    import json

    from nanoseek.cli import main
    from nanoseek.tasks import distinct_examples

    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny", vocab_size=TOK.vocab_size)).save_pretrained(tmp_path)
    TOK.save(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--task", "countdown", "--n", "1000", "--num-generations", "0",
                 "--max-completion-length", "2", "--json", str(tmp_path / "r.json")]) == 0
    split = len(distinct_examples(TASK, 1000, "eval", seed=0))
    assert f"has {split} distinct problems" in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == split < 1000 and len(result["greedy_correct"]) == split
