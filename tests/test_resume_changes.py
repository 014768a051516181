"""--resume with changed settings: refused with each changed flag's old and new value (the run directory left as it
was) unless the change is the run's length, a cadence or logging, or --resume-with-changes is given; every segment's
config is kept (OUT/<kind>_config.json the first, OUT/<kind>_configs.jsonl each resumed one). The same for every
command on the shared run loop: pretrain here, GRPO and PPO in test_resume_changes_rl."""

import json

import pytest

from nanoseek import cli
from nanoseek.checkpoint import latest_checkpoint
from nanoseek.metrics import read_jsonl, read_metrics

TRAIN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--no-progress", "--lr", "0.003"]


def pretrain(out, *extra, command: str = "pretrain") -> int:
    return cli.main([command, *TRAIN, "--out", str(out), *extra])


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_changed_settings_are_refused_naming_old_and_new(tmp_path, capsys, command):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2", command=command) == 0
    before = (out / "metrics.jsonl").read_text(), latest_checkpoint(out), (out / f"{command}_config.json").read_text()
    capsys.readouterr()
    assert pretrain(out, "--steps", "3", "--resume", "--lr", "0.001", "--seed", "1", command=command) == 2
    err = capsys.readouterr().err
    assert "--lr 0.003 -> 0.001" in err and "--seed 0 -> 1" in err and "--resume-with-changes" in err
    assert "--steps" not in err  # the run's length may change
    assert ((out / "metrics.jsonl").read_text(), latest_checkpoint(out),
            (out / f"{command}_config.json").read_text()) == before
    assert not (out / f"{command}_configs.jsonl").exists()


def test_length_and_cadences_may_change_and_every_segment_is_kept(tmp_path):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2") == 0
    assert pretrain(out, "--steps", "3", "--resume", "--save-every", "1", "--log-every", "5", "--keep", "3") == 0
    assert pretrain(out, "--steps", "4", "--resume", "--lr", "0.001", "--resume-with-changes") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    first = json.loads((out / "pretrain_config.json").read_text())
    assert (first["steps"], first["lr"], first["save_every"]) == (2, 0.003, 0)
    segments = read_jsonl(out / "pretrain_configs.jsonl")
    assert [s["resumed_from_step"] for s in segments] == [2, 3]
    assert [(s["config"]["steps"], s["config"]["lr"], s["config"]["save_every"]) for s in segments] == [
        (3, 0.003, 1), (4, 0.001, 0)]
    # the checkpoint records the segment that wrote it: resuming now compares with --lr 0.001
    assert pretrain(out, "--steps", "5", "--resume", "--lr", "0.001") == 0


def test_a_new_run_keeps_one_config(tmp_path):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "1") == 0
    assert pretrain(out, "--steps", "1", "--lr", "0.001", "--overwrite") == 0
    assert json.loads((out / "pretrain_config.json").read_text())["lr"] == 0.001
    assert not (out / "pretrain_configs.jsonl").exists()
