"""Run directories and logs after resume: a command refuses a directory holding something else unless
--resume / --overwrite; every step is logged exactly once after a SIGKILL at any point and --resume, and the
resumed weights equal an uninterrupted run's; torn and corrupt log lines are named by file and line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.checkpoint import latest_checkpoint
from nanoseek.hf import read_safetensors
from nanoseek.metrics import MetricsLogger, read_jsonl, read_metrics, rewind_log
from nanoseek.rundir import MARKER, RunDirError, check_run_dir, recorded_kind

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--no-progress", "--seed", "3"]


def pretrain(out, *extra, command="pretrain"):
    return cli.main([command, *TRAIN, "--out", str(out), *extra])


def steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


# ---------------------------------------------------------------------- refusing, resuming, overwriting
def test_rerun_without_resume_refuses_and_keeps_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "3") == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert pretrain(out, "--steps", "3") == 2
    err = capsys.readouterr().err
    assert str(out) in err and "a run of `nanoseek pretrain`" in err and "step_00000003" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert latest_checkpoint(out).name == "step_00000003"


def test_another_kind_of_run_is_refused_even_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2") == 0
    capsys.readouterr()
    assert pretrain(out, "--steps", "2", "--resume", "--task", "countdown", command="sft") == 2
    err = capsys.readouterr().err
    assert "a run of `nanoseek pretrain`" in err and "not a run of `nanoseek sft`" in err and "--overwrite" in err
    assert recorded_kind(out) == "pretrain" and steps(out) == [1, 2]


def test_a_model_it_did_not_write_is_refused(tmp_path, capsys):
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer

    model_dir = tmp_path / "model"
    Transformer(ModelConfig.preset("tiny")).save_pretrained(model_dir)
    for flags in ([], ["--resume"]):
        assert pretrain(model_dir, "--steps", "1", *flags) == 2
        err = capsys.readouterr().err
        assert "a model (config.json / weights)" in err and "--overwrite" in err
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert pretrain(other, "--steps", "1") == 2
    assert "1 file(s): todo.txt" in capsys.readouterr().err


def test_overwrite_clears_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "4", "--save-every", "1") == 0
    (out / "completions.jsonl").write_text('{"step": 4}\n')
    assert pretrain(out, "--steps", "2", "--overwrite") == 0
    assert steps(out) == [1, 2] and not (out / "completions.jsonl").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert json.loads((out / MARKER).read_text()) == {"kind": "pretrain"}


def test_overwrite_never_deletes_the_working_directory_or_a_git_checkout(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    for path in (".", tmp_path, tmp_path.parent):
        with pytest.raises(RunDirError, match="will not delete.*working directory"):
            check_run_dir(path, "pretrain", overwrite=True)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(RunDirError, match="will not delete.*git checkout"):
        check_run_dir(repo, "pretrain", overwrite=True)
    with pytest.raises(RunDirError, match="pass one of them"):
        check_run_dir(tmp_path / "new", "pretrain", resume=True, overwrite=True)


def test_resume_on_an_empty_directory_starts_a_new_run_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2", "--resume") == 0
    assert "holds no run yet; starting a new `nanoseek pretrain` run" in capsys.readouterr().err
    assert steps(out) == [1, 2]


def test_a_run_directory_without_its_marker_is_recognised_and_resumed(tmp_path):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2") == 0
    (out / MARKER).unlink()  # pretrain_config.json says the kind
    assert recorded_kind(out) == "pretrain"
    assert pretrain(out, "--steps", "3", "--resume") == 0
    assert steps(out) == [1, 2, 3] and recorded_kind(out) == "pretrain"


def test_an_unwritable_out_fails_at_start(tmp_path, capsys, monkeypatch):
    import nanoseek.train.pretrain as pretrain_module

    (tmp_path / "file").write_text("x")
    built = []
    monkeypatch.setattr(pretrain_module, "wrap_model", lambda *a, **k: built.append(1))  # training would start here
    assert pretrain(tmp_path / "file" / "run", "--steps", "1") == 2
    assert f"run directory {tmp_path / 'file' / 'run'} is not writable" in capsys.readouterr().err and not built
    assert pretrain(tmp_path / "file", "--steps", "1") == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_refuses_an_earlier_run_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stages.json").write_text("{}")  # a demo's stages file, no marker
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a run of `nanoseek demo`" in err and "--resume" in err and "--overwrite" in err
    assert (out / "stages.json").read_text() == "{}"
    sft = tmp_path / "sft"
    assert pretrain(sft, "--steps", "1", "--task", "countdown", "--seq-len", "32", command="sft") == 0
    capsys.readouterr()
    assert cli.main(["demo", "--quick", "--out", str(sft), "--resume"]) == 2
    assert "not a run of `nanoseek demo`" in capsys.readouterr().err
    assert latest_checkpoint(sft).name == "step_00000001"


# ---------------------------------------------------------------------- logs
def test_torn_last_line_is_dropped_with_a_warning_and_a_corrupt_line_is_an_error(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    assert f"{log}:3: dropping a torn last line" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 0 and (tmp_path / "metrics.png").exists()
    assert f"{log}:3" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{log}:2: corrupt log line"):
        read_jsonl(log)
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert f"{log}:2: corrupt log line" in capsys.readouterr().err


def test_rewind_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "completions.jsonl"
    log.write_text("".join(json.dumps({"step": s, "i": i}) + "\n" for s in (1, 2, 2, 3, 4) for i in range(2))
                   + '{"step": 5, "compl')
    rewind_log(log, 2)
    assert [r["step"] for r in read_jsonl(log)] == [1, 1, 2, 2, 2, 2]
    logger = MetricsLogger(tmp_path, 10, start_step=1, progress=False)  # rewinds every run log
    logger.log(2, loss=1.0)
    logger.close()
    assert [r["step"] for r in read_jsonl(log)] == [1, 1] and steps(tmp_path) == [2]


def test_resume_after_a_torn_metrics_line_logs_each_step_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "--steps", "2") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a kill in the middle of writing step 3
    assert pretrain(out, "--steps", "4", "--resume") == 0
    assert "metrics.jsonl:3: dropping a torn last line" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3, 4]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert pretrain(out, "--steps", "5", "--resume") == 2
    assert "metrics.jsonl:2: corrupt log line" in capsys.readouterr().err


# ---------------------------------------------------------------------- SIGKILL at several points, then --resume
KILL_ARGS = [*TRAIN, "--steps", "8", "--save-every", "1", "--keep", "2"]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread, as the in-process runs


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", *KILL_ARGS, "--out", str(out), *extra],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _logged(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, out: Path, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready(out)`` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready(out):
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp_") for p in root.iterdir())


def _latest_is(out: Path, name: str) -> bool:
    try:
        return (out / "checkpoints" / "latest").read_text().strip() == name
    except FileNotFoundError:
        return False


def _kill_and_resume(tmp_path: Path, kill_points) -> None:
    """Run 8 steps straight, and again with a SIGKILL at each of ``kill_points`` (each followed by --resume);
    the killed run's metrics hold steps 1..8 exactly once and its final weights equal the straight run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(["pretrain", *KILL_ARGS, "--out", str(straight)]) == 0
    for i, point in enumerate(kill_points):
        _kill_when(_start(killed, *(["--resume"] if i else [])), killed, point)
    done = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", *KILL_ARGS, "--out", str(killed),
                           "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps(killed) == list(range(1, 9))
    a, b = latest_checkpoint(straight), latest_checkpoint(killed)
    assert a.name == b.name == "step_00000008"
    wa, wb = read_safetensors(a), read_safetensors(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_logs_each_step_once_and_matches(tmp_path):
    _kill_and_resume(tmp_path, [lambda out: _logged(out) >= 3])  # step 3 logged: in its save or in step 4


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path):
    _kill_and_resume(tmp_path, [
        lambda out: _logged(out) >= 2,  # after step 2 is logged (during its save or the next step)
        lambda out: _saving(out) and _logged(out) >= 4,  # during a checkpoint save
        lambda out: _latest_is(out, "step_00000006"),  # right after a checkpoint
    ])
