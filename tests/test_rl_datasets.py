"""RL on the user's data: prompts from a dataset (conversational ones through the chat template), extra columns
row-aligned to a reward function named by import path, rewards refused at start when a column is missing, the
built-in task's prompts unchanged, and evaluation during training (``--eval-every``, ``--save-best``)."""

import json
import sys

import pytest
import torch
from test_grpo import TASK, read_metrics
from test_grpo_process import make_trainer, random_checkpoint, scripted_samples

from nanoseek.cli import main as cli_main
from nanoseek.datasets import Row
from nanoseek.evaluate import evaluate, scalar_metrics
from nanoseek.policy import Samples
from nanoseek.rewards import RewardResult
from nanoseek.tasks import examples, get_task
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.rl import RLTrainer

REWARD_MODULE = '''
CALLS = []

def digit_reward(prompts, completions, completion_ids, target, **kwargs):
    """1.0 where the completion is the row's target digit; records what it was given."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                  "target": target, "other": kwargs.get("other")})
    return [float(c[0]["content"] == t) for c, t in zip(completions, target)]


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]
'''
ROWS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "target": str((a + b) % 10), "other": a}
        for a in range(6) for b in range(1, 3)]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    yield "my_rewards:digit_reward"
    sys.modules.pop("my_rewards", None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_prompts_chat_template_and_aligned_columns(tmp_path, reward_module):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    trainer = make_trainer(random_checkpoint(tmp_path / "m"), dataset=str(data), reward_funcs=[reward_module],
                           num_generations=2, prompts_per_step=3, max_completion_length=2,
                           system_prompt="Be brief.", reward_timeout_s=None)
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_id
    rows = trainer.prompts(1)
    assert all(isinstance(r, Row) for r in rows) and len(rows) == 3
    assert rows == trainer.data.train.batch(0, 3, seed=0)  # the dataset's seeded epoch order
    # the exact rendered text: the default template, the system prompt, the generation prompt, one BOS
    assert trainer.encode(rows[0].prompt) == tok.encode(
        f"System: Be brief.\n\nUser: {rows[0].prompt[0]['content']}\nAssistant: ", add_bos=True)
    answers = [r.columns["target"] for r in rows]

    def sample(prompts, params, seed):  # row 0 right twice, row 1 right once, row 2 wrong twice
        texts = [answers[0], answers[0], answers[1], "x", "x", "y"]
        return scripted_samples([tok.encode(t) + [eos] for t in texts], 2, eos)

    trainer.policy.sample = sample
    rollout, _ = trainer.collect(1)
    assert rollout.rewards.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    import my_rewards

    (call,) = my_rewards.CALLS
    assert call["target"] == [a for a in answers for _ in range(2)]  # row-aligned with the completions
    assert call["other"] == [r.columns["other"] for r in rows for _ in range(2)]
    assert call["prompts"] == [r.prompt for r in rows for _ in range(2)]  # the dataset's messages, as TRL does
    assert call["completions"][3] == [{"role": "assistant", "content": "x"}]
    assert call["completion_ids"][0] == tok.encode(answers[0]) + [eos]


def test_task_prompts_unchanged():
    """Without --dataset the built-in task draws exactly the examples it always drew."""
    cfg = GRPOConfig(model="unused", task_kwargs=TASK, prompts_per_step=5, seed=2)
    trainer = RLTrainer.__new__(RLTrainer)
    from nanoseek.train.rl_data import rl_data

    trainer.cfg, trainer.rank, trainer.world, trainer.data = cfg, 0, 1, rl_data(cfg, None)
    want = examples(get_task("arithmetic", **TASK), 5, "train", seed=(2 * 1_000_003 + 3 - 1) * 101 + 1)
    got = trainer.prompts(3, round_=1)
    assert [r.prompt for r in got] == [e.prompt for e in want] and [r.answer for r in got] == [e.answer for e in want]


def test_missing_reward_column_fails_at_start(tmp_path, reward_module, capsys):
    model = random_checkpoint(tmp_path / "m")
    code = cli_main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--reward-funcs", reward_module,
                     "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "digit_reward" in err and "'target'" in err and "task arithmetic" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    code = cli_main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--dataset", str(data),
                     "--reward-funcs", reward_module, "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "digit_reward" in err and str(data) in err
    code = cli_main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--dataset", str(data),
                     "--steps", "1"])
    assert code == 2 and "--reward-funcs" in capsys.readouterr().err


# ---------------------------------------------------------------------- evaluation during training
class ScriptedPolicy:
    """``Policy.sample`` returning the given texts in order, one call after another."""

    def __init__(self, tok, calls: list[list[str]], eos: int):
        self.model, self.tok, self.calls, self.eos = torch.nn.Linear(1, 1), tok, iter(calls), eos

    def sample(self, prompts, params, seed):
        texts = next(self.calls)
        assert len(texts) == len(prompts)
        return Samples([self.tok.encode(t) + [self.eos] for t in texts], [[0.0]] * len(texts), [False] * len(texts))


def test_evaluate_metrics_by_hand():
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.char()
    rows = [Row("a", columns={"answer": "1"}), Row("b", columns={"answer": "2"}), Row("c", columns={"answer": "3"})]

    class Scorer:  # right answer: 1; a second function that never verifies row 2
        def outcome(self, rows, texts, completion_ids):
            right = [float(t == r.answer) for r, t in zip(rows, texts)]
            other = [0.0 if r.prompt == "c" else 1.0 for r in rows]
            return RewardResult([a + 0.5 * b for a, b in zip(right, other)], {"right": right, "other": other})

    greedy = ["1", "0", "3"]
    samples = ["0", "1", "0", "0", "3", "3"]  # k = 2: row a has one right sample, b none, c two
    policy = ScriptedPolicy(tok, [greedy, samples], 2)
    m = scalar_metrics(evaluate(policy, tok.encode, tok.decode, rows, Scorer(), ["right"], k=2,
                                max_completion_length=4))
    assert m == {"accuracy": 2 / 3, "reward": (1.5 + 0.5 + 1.0) / 3, "mean_length": 2.0, "pass@2": 2 / 3,
                 "sample_accuracy": 3 / 6, "maj@2": 1 / 3}  # majority: a ties "0"/"1" -> "0" wrong, b wrong, c right
    policy = ScriptedPolicy(tok, [greedy], 2)  # both functions must verify: row c fails "other"
    m = scalar_metrics(evaluate(policy, tok.encode, tok.decode, rows, Scorer(), ["right", "other"], k=0))
    assert m["accuracy"] == 1 / 3 and "pass@0" not in m


def test_eval_every_logs_metrics(tmp_path):
    cfg = GRPOConfig(model=str(random_checkpoint(tmp_path / "m")), out=str(tmp_path / "run"), task_kwargs=TASK,
                     num_generations=2, prompts_per_step=2, max_completion_length=3, steps=3, eval_every=2,
                     eval_n=4, eval_num_generations=2, progress=False)
    train_grpo(cfg)
    rows = read_metrics(tmp_path / "run")
    evaluated = [r["step"] for r in rows if "eval/accuracy" in r]
    assert evaluated == [2, 3]  # every 2 steps and at the end
    for r in rows:
        if r["step"] in evaluated:
            assert {"eval/accuracy", "eval/pass@2", "eval/sample_accuracy", "eval/reward", "eval/mean_length"} <= set(r)
            assert 0 <= r["eval/accuracy"] <= r["eval/pass@2"] <= 1 and 1 <= r["eval/mean_length"] <= 3


def test_eval_dataset_on_a_task_scores_with_its_answer_column(tmp_path):
    """A task run validated on a JSONL of prompt + answer rows: the task's reward reads the answer column."""
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(1, 5)]
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    trainer = make_trainer(random_checkpoint(tmp_path / "m"), eval_every=1, eval_dataset=str(data),
                           eval_num_generations=0, max_completion_length=3)
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_id
    answers = iter([["2", "4", "9", "8"]])  # the third is wrong
    trainer.policy.sample = lambda prompts, params, seed: scripted_samples(
        [tok.encode(t) + [eos] for t in next(answers)], 3, eos)
    m = trainer.evaluate(1)
    assert m["eval/accuracy"] == 0.75 and m["eval/reward"] == 0.75


def test_save_best_keeps_the_best_step(tmp_path, monkeypatch, reward_module):
    from safetensors.torch import load_file

    scripted = {1: 0.2, 2: 0.7, 3: 0.7, 4: 0.5}  # the best is step 2 (a tie later does not replace it)
    monkeypatch.setattr(RLTrainer, "evaluate", lambda self, step: {"eval/accuracy": scripted[step]})
    run = tmp_path / "run"
    cfg = GRPOConfig(model=str(random_checkpoint(tmp_path / "m")), out=str(run), task_kwargs=TASK,
                     num_generations=2, prompts_per_step=2, max_completion_length=3, steps=4, eval_every=1,
                     save_best="accuracy", save_every=1, keep=4, lr=1e-2, progress=False,
                     reward_funcs=["my_rewards:length_reward"])  # lengths differ: the weights move every step
    summary = train_grpo(cfg)
    assert summary["best"] == {"metric": "eval/accuracy", "value": 0.7, "step": 2}
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2
    best = sorted((run / "best" / "checkpoints").glob("step_*"))
    assert [p.name for p in best] == ["step_00000002"]
    got = load_file(best[0] / "model.safetensors")
    want = load_file(run / "checkpoints" / "step_00000002" / "model.safetensors")
    later = load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], later[k]) for k in want)  # training moved on after step 2
    with pytest.raises(ValueError, match="--save-best needs --eval-every"):
        GRPOConfig(model="m", save_best="accuracy").validate()


def test_ppo_on_a_dataset_with_held_out_split(tmp_path, reward_module):
    from nanoseek.train.ppo import PPOConfig, train_ppo

    rows = [{"prompt": f"{a}+{b}=", "target": str(a + b)} for a in range(10) for b in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = PPOConfig(model=str(random_checkpoint(tmp_path / "m")), out=str(tmp_path / "run"), dataset=str(data),
                    reward_funcs=["my_rewards:length_reward"], num_generations=2, prompts_per_step=2,
                    max_completion_length=3, steps=1, eval_every=1, eval_num_generations=0, progress=False)
    train_ppo(cfg)
    (row,) = read_metrics(tmp_path / "run")
    assert {"eval/accuracy", "eval/reward", "eval/mean_length"} <= set(row) and "eval/pass@0" not in row
    # one prompt in 10 is held out of training (by a hash of its text), and the evaluation uses those
    from nanoseek.datasets import load_prompts
    from nanoseek.train.rl_data import rl_data

    train, held = load_prompts(data).split(10)
    got = rl_data(cfg, None)
    assert got.train.rows == train.rows and got.held_out.rows == held.rows and len(held) < len(rows) // 3
