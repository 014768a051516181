"""``sft --dataset``: prompt + completion rows as they are (one EOS appended), ``messages`` rows through the chat
template (its end of turn is the only EOS, one BOS), and ``nanoseek sample`` output fine-tuned on directly."""

import json

import pytest
from test_sample import checkpoint, dataset_file  # noqa: F401 - fixtures

from nanoseek.cli import main
from nanoseek.data import DatasetData
from nanoseek.tokenizer import Tokenizer


def test_rows_tokenized_exactly(tmp_path):
    tok = Tokenizer.char()
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
            {"prompt": "3+4=", "completion": "7", "answer": "7"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DatasetData(str(path), tok, 64)
    (chat, n_chat), (plain, n_plain) = data.rows
    head = tok.encode("User: 1+1=\nAssistant: ", add_bos=True)
    assert (chat, n_chat) == (head + tok.encode("2") + [tok.eos_id], len(head))  # the template's EOS, only one
    assert (plain, n_plain) == (tok.encode("3+4=", add_bos=True) + tok.encode("7") + [tok.eos_id], 5)
    data = DatasetData(str(path), tok, 64, system_prompt="Add.")
    head = tok.encode("System: Add.\n\nUser: 3+4=\nAssistant: ", add_bos=True)
    assert data.rows[1] == (head + tok.encode("7") + [tok.eos_id], len(head))
    with pytest.raises(ValueError, match="more than --seq-len 10"):
        DatasetData(str(path), tok, 10)
    path.write_text(json.dumps({"prompt": "[1]+1=", "completion": "[2"}) + "\n")  # JSON strings stay text
    assert DatasetData(str(path), tok, 64).rows == [(tok.encode("[1]+1=", add_bos=True) + tok.encode("[2") +
                                                     [tok.eos_id], 7)]


def test_sft_on_sample_output(tmp_path, checkpoint):  # noqa: F811 - the fixture
    data, _ = dataset_file(tmp_path)
    samples = tmp_path / "samples.jsonl"
    assert main(["sample", "--model", str(checkpoint), "--dataset", str(data), "--num-samples", "2", "--keep", "all",
                 "--max-new-tokens", "6", "--out", str(samples)]) == 0
    kinds = {type(json.loads(line)["completion"]).__name__ for line in samples.read_text().splitlines()}
    assert kinds == {"str", "list"}  # plain and conversational rows
    run = tmp_path / "run"
    assert main(["sft", "--model", str(checkpoint), "--dataset", str(samples), "--steps", "2", "--batch-size",
                 "4", "--seq-len", "48", "--out", str(run), "--no-progress"]) == 0
    assert (run / "checkpoints" / "latest").is_file()


LEVEL_REWARDS = '''
def level0(prompts, completions, level, **kwargs):
    return [float(lv == 0) for lv in level]

def level_at_most_1(prompts, completions, level, **kwargs):
    return [float(lv <= 1) for lv in level]
'''


def test_eval_dataset_counts_completions_every_reward_verifies(tmp_path, checkpoint, monkeypatch, capsys):  # noqa: F811
    (tmp_path / "level_rewards.py").write_text(LEVEL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data, _ = dataset_file(tmp_path)  # six rows, levels 0 1 2 0 1 2, two of them conversational
    common = ["eval", "--model", str(checkpoint), "--dataset", str(data), "--k", "2", "--max-new-tokens", "16"]

    def accuracy(*fns) -> dict:
        assert main([*common, "--reward-funcs", *fns]) == 0
        return json.loads(capsys.readouterr().out)

    assert accuracy("level_rewards:level_at_most_1")["accuracy"] == pytest.approx(4 / 6)
    both = accuracy("level_rewards:level0", "level_rewards:level_at_most_1")
    assert both["accuracy"] == pytest.approx(2 / 6) and both["pass@2"] == pytest.approx(2 / 6)
    assert both["reward"] == pytest.approx((2 * 2 + 2) / 6) and both["n"] == 6
    assert main([*common]) == 2 and "--reward-funcs" in capsys.readouterr().err
