"""Run directories, step numbering and logs after resume for the RL commands (``grpo``, ``ppo``): the same
contract as pretrain/sft (tests/test_rundir.py). Steps count from 1: the N-th optimizer step logs "step": N,
its checkpoint is step_N, and completions.jsonl records carry the step they were sampled in."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek import cli
from nanoseek.checkpoint import latest_checkpoint
from nanoseek.metrics import read_jsonl, read_metrics
from nanoseek.rundir import recorded_kind

ROOT = Path(__file__).resolve().parents[1]
RL = ["--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4", "--no-progress",
      "--log-completions-every", "1"]


def rl(command: str, model: Path, out: Path, *extra: str) -> int:
    return cli.main([command, "--model", str(model), "--out", str(out), *RL, *extra])


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_steps_count_from_one(sft_run, tmp_path, command):
    out = tmp_path / command
    assert rl(command, sft_run, out, "--steps", "3", "--save-every", "1") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved == [1, 2, 3][-len(saved):] and latest_checkpoint(out).name == "step_00000003"
    assert {r["step"] for r in read_jsonl(out / "completions.jsonl")} == {1, 2, 3}
    assert recorded_kind(out) == command


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_out_pointed_at_an_sft_run_is_refused(sft_run, command, capsys):
    before = (sft_run / "metrics.jsonl").read_text(), latest_checkpoint(sft_run)
    for flags in ([], ["--resume"]):
        assert rl(command, sft_run, sft_run, "--steps", "1", *flags) == 2
        err = capsys.readouterr().err
        assert "a run of `nanoseek sft`" in err and "--overwrite" in err
    assert ((sft_run / "metrics.jsonl").read_text(), latest_checkpoint(sft_run)) == before


def test_rerun_refuses_resume_continues_overwrite_restarts(sft_run, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert rl("grpo", sft_run, out, "--steps", "2") == 0
    capsys.readouterr()
    assert rl("grpo", sft_run, out, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "a run of `nanoseek grpo`" in err and "--resume" in err and "--overwrite" in err
    assert rl("grpo", sft_run, out, "--steps", "3", "--resume") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert rl("grpo", sft_run, out, "--steps", "1", "--overwrite") == 0
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert latest_checkpoint(out).name == "step_00000001"


@pytest.mark.parametrize(("flag", "value"), [("--epsilon", "-1"), ("--save-every", "-1"), ("--steps", "0")])
def test_rl_numeric_flags_are_range_checked(sft_run, tmp_path, capsys, flag, value):
    assert rl("grpo", sft_run, tmp_path / "run", flag, value) == 2
    captured = capsys.readouterr()
    assert flag in captured.err and not captured.out and not (tmp_path / "run").exists()


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _grpo(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "grpo", "--model", str(model), "--out", str(out), *RL,
                             "--steps", "6", "--save-every", "1", *extra], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_bytes().count(b"\n") < n:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.001)


@pytest.mark.slow
def test_sigkill_then_resume_logs_each_step_once(sft_run, tmp_path):
    out = tmp_path / "grpo"
    for i, n in enumerate((2, 4)):
        proc = _grpo(sft_run, out, *(["--resume"] if i else []))
        _wait_for_steps(proc, out, n)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    proc = _grpo(sft_run, out, "--resume")
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    per_step = collections.Counter(r["step"] for r in read_jsonl(out / "completions.jsonl"))
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6] and len(set(per_step.values())) == 1  # each step's samples once


@pytest.mark.slow
def test_ctrl_c_saves_then_exits_130(sft_run, tmp_path):
    out = tmp_path / "grpo"
    proc = _grpo(sft_run, out)
    _wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    proc.stderr.close()
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # no torn line after a Ctrl-C
