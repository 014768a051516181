"""The RL commands' run segments and logs: --resume refuses changed settings (GRPO and PPO, as pretrain in
test_resume_changes); completions.jsonl on the steps evaluations and checkpoints use and the last; --eval-on-start
logs step 0; dynamic sampling logs its groups and rounds; strict JSON (NaN as null) in every log."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoseek import cli
from nanoseek.metrics import MetricsLogger, read_jsonl, read_metrics, rewind_log
from nanoseek.policy import Policy
from nanoseek.rewards import RewardResult
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig
from nanoseek.train.rl import RLTrainer, _log_completions

RL = ["--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4", "--no-progress"]


class Rollout(SimpleNamespace):
    """The fields of nanoseek.rollout.Rollout that _log_completions reads."""

    def __len__(self) -> int:
        return len(self.texts)


def strict(text: str) -> list[dict]:
    """JSON lines parsed as JSON itself defines it (json.loads also takes NaN and Infinity)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def rl(command: str, model: Path, out: Path, *extra: str) -> int:
    return cli.main([command, "--model", str(model), "--out", str(out), *RL, *extra])


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_resume_refuses_changed_settings_unless_asked(sft_run, tmp_path, capsys, command):
    out = tmp_path / command
    assert rl(command, sft_run, out, "--steps", "1") == 0
    capsys.readouterr()
    assert rl(command, sft_run, out, "--steps", "2", "--resume", "--num-generations", "4") == 2
    assert "--num-generations 2 -> 4" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert rl(command, sft_run, out, "--steps", "2", "--resume", "--log-completions-every", "1") == 0
    assert rl(command, sft_run, out, "--steps", "3", "--resume", "--num-generations", "4",
              "--resume-with-changes") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / f"{command}_config.json").read_text())["num_generations"] == 2
    assert [s["config"]["num_generations"] for s in read_jsonl(out / f"{command}_configs.jsonl")] == [2, 4]


def test_completions_on_the_eval_steps_and_the_last_and_eval_on_start(sft_run, tmp_path):
    out = tmp_path / "grpo"
    assert rl("grpo", sft_run, out, "--steps", "5", "--log-completions-every", "2", "--eval-every", "2",
              "--eval-n", "4", "--eval-num-generations", "0", "--eval-on-start") == 0
    records = strict((out / "metrics.jsonl").read_text())
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert set(records[0]) == {"step", "time"} | {k for k in records[2] if k.startswith("eval/")}
    evaluated = [r["step"] for r in records if "eval/accuracy" in r]
    assert evaluated == [0, 2, 4, 5]
    assert sorted({r["step"] for r in strict((out / "completions.jsonl").read_text())}) == [2, 4, 5]


def test_eval_on_start_needs_eval_every(sft_run, tmp_path, capsys):
    assert rl("grpo", sft_run, tmp_path / "run", "--eval-on-start") == 2
    assert "--eval-on-start needs --eval-every" in capsys.readouterr().err


def test_dynamic_sampling_logs_groups_kept_dropped_and_rounds(sft_run):
    model = str(sft_run / "checkpoints" / "step_00000002")
    tok = Tokenizer.load(model)
    cfg = GRPOConfig(model=model, num_generations=2, prompts_per_step=3, max_completion_length=2,
                     dynamic_sampling=True, max_resample_rounds=3, progress=False)
    trainer = RLTrainer(cfg, Policy.load(model, tok.pad_id, tok.eos_id), tok, GRPO)
    # rounds of 3 groups: round 0 -> one informative group, round 1 -> one, round 2 -> two (one is needed): 3 rounds
    scripted = iter([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 1]])

    def outcome(examples, texts, completion_ids=None):
        r = [float(x) for x in next(scripted)]
        return RewardResult(r, {"scripted": r})

    trainer.scorer = SimpleNamespace(outcome=outcome, process_fn=None, names=["scripted"])
    m, _ = trainer.step(1)
    assert (m["sampling/groups_kept"], m["sampling/groups_dropped"], m["sampling/rounds"]) == (3, 6, 3)
    assert m["frac_reward_zero_std"] == pytest.approx(5 / 9)


def test_logs_are_strict_json(tmp_path):
    logger = MetricsLogger(tmp_path, 2, progress=False)
    logger.log(1, loss=float("nan"), lr=float("inf"), nested={"a": [1.0, float("-inf")]}, t=torch.tensor(math.nan))
    logger.close()
    (record,) = strict((tmp_path / "metrics.jsonl").read_text())
    assert (record["loss"], record["lr"], record["nested"], record["t"]) == (None, None, {"a": [1.0, None]}, None)
    rewind_log(tmp_path / "metrics.jsonl", 1)
    assert strict((tmp_path / "metrics.jsonl").read_text()) == [record]
    nan = torch.tensor([math.nan, 1.0])  # a reward function's NaN (kept with --reward-errors skip) and its advantage
    rollout = Rollout(examples=[SimpleNamespace(prompt="1+1=", answer="2")] * 2, texts=["2", "3"], rewards=nan,
                      advantages=nan, batch=SimpleNamespace(prompt_index=torch.tensor([0, 1]),
                                                            completion_lens=torch.tensor([1, 1])))
    _log_completions(tmp_path / "completions.jsonl", 1, rollout, 2)
    logged = strict((tmp_path / "completions.jsonl").read_text())
    assert [(r["reward"], r["advantage"]) for r in logged] == [(None, None), (1.0, 1.0)]
