"""Broken reward functions in every command that scores (grpo, ppo, eval, sample): one that raises, returns the
wrong number of values, NaN or never returns stops the command (exit 1) naming the function and the row, unless
``--reward-errors skip``: then its failing values are left out, counted per step, and its mean is NaN, never 0.0."""

import json
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.metrics import read_metrics
from nanoseek.tokenizer import Tokenizer

REWARDS = '''
import time

def fine(prompts, completions, **kw):
    return [float(len(c) % 2) for c in completions]

def raises(prompts, completions, **kw):
    raise ZeroDivisionError("my bug")

def short(prompts, completions, **kw):
    return [1.0]

def nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)

def hangs(prompts, completions, **kw):
    time.sleep(600)

def minus_fails(prompts, completions, **kw):
    """Raises on subtraction prompts: fails on some rows only."""
    if any("-" in p for p in prompts):
        raise ValueError("cannot subtract")
    return [1.0] * len(completions)
'''


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A random tiny char-tokenizer model, and the reward module rw_errors.py on the path."""
    tok = Tokenizer.char()
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).float().save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    (tmp_path / "rw_errors.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def rl(kind, tmp_path, *flags):
    return main([kind, "--model", str(tmp_path / "model"), "--task", "arithmetic", "--num-generations", "2",
                 "--prompts-per-step", "2", "--max-completion-length", "3", "--out", str(tmp_path / kind),
                 "--no-progress", *flags])


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
@pytest.mark.parametrize("fn, why", [("raises", "ZeroDivisionError: my bug"),
                                     ("short", "returned 1 values for 4 completions"), ("nan", "gave nan")])
def test_a_failing_reward_stops_the_run_naming_function_and_row(setup, capsys, kind, fn, why):
    assert rl(kind, setup, "--steps", "2", "--reward-funcs", f"rw_errors:{fn}") == 1
    err = capsys.readouterr().err
    assert f"reward function {fn} failed on completion 0 of 4 (prompt '" in err and why in err
    assert "--reward-errors skip" in err
    assert not (setup / kind / "checkpoints").exists()  # stopped at step 1, not trained on zero rewards


def test_a_hanging_reward_is_stopped_by_the_timeout(setup, capsys):
    assert rl("grpo", setup, "--steps", "1", "--reward-funcs", "rw_errors:hangs", "--reward-timeout-s", "0.5") == 1
    err = capsys.readouterr().err
    assert "reward function hangs failed on completion 0 of 4" in err
    assert "no result within 0.5 s (--reward-timeout-s)" in err


def no_value(v) -> bool:
    """NaN as metrics.jsonl writes it (a string today; null once strict): never 0.0."""
    return v is None or v == "nan" or (isinstance(v, float) and math.isnan(v))


def test_skip_logs_counts_and_nan_means_and_trains_on_the_rest(setup):
    assert rl("grpo", setup, "--steps", "3", "--lr", "1e-2", "--reward-funcs", "rw_errors:fine", "rw_errors:raises",
              "rw_errors:minus_fails", "--reward-errors", "skip", "--log-completions-every", "1") == 0
    ms = read_metrics(setup / "grpo")
    logged = [json.loads(line) for line in (setup / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ms] == [1, 2, 3]
    for m in ms:
        assert m["rewards/raises/errors"] == 4 and m["rewards/fine/errors"] == 0 and no_value(m["rewards/raises/mean"])
        minus = sum("-" in c["prompt"] for c in logged if c["step"] == m["step"])  # the rows minus_fails fails on
        assert m["rewards/minus_fails/errors"] == minus
        assert no_value(m["rewards/minus_fails/mean"]) if minus == 4 else m["rewards/minus_fails/mean"] == 1.0
        assert not no_value(m["rewards/fine/mean"]) and not no_value(m["rewards/arithmetic_reward/mean"])
    assert 0 < sum(m["rewards/minus_fails/errors"] for m in ms) < 12 and math.isfinite(ms[-1]["loss"])
    before = Transformer.from_pretrained(setup / "model").state_dict()
    after = Transformer.from_pretrained(setup / "grpo" / "checkpoints" / "step_00000003").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on the values that were given


def test_eval_and_sample_exit_1_when_no_reward_could_be_computed(setup, capsys):
    out, common = setup / "s.jsonl", ["--model", str(setup / "model"), "--dataset", str(write_prompts(setup)),
                                      "--max-completion-length", "3", "--reward-funcs", "rw_errors:raises"]
    for mode, why in (("raise", "reward function raises failed on completion 0 of "),
                      ("skip", "no reward could be computed: every value of every reward function failed")):
        assert main(["eval", *common, "--num-generations", "2", "--reward-errors", mode]) == 1
        assert why in capsys.readouterr().err
        assert main(["sample", *common, "--num-generations", "2", "--keep", "all", "--out", str(out),
                     "--reward-errors", mode]) == 1
        assert why in capsys.readouterr().err and not out.exists()


def write_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(3)))
    return path


def test_sample_writes_strict_json_without_nan(setup):
    out = setup / "s.jsonl"
    assert main(["sample", "--model", str(setup / "model"), "--dataset", str(write_prompts(setup)),
                 "--num-generations", "2", "--max-completion-length", "3", "--reward-funcs", "rw_errors:fine",
                 "rw_errors:nan", "--keep", "all", "--out", str(out), "--reward-errors", "skip"]) == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["rewards"]["nan"] is None and r["rewards"]["fine"] in (0.0, 1.0) for r in rows)
    assert [r["reward"] for r in rows] == [r["rewards"]["fine"] for r in rows]
