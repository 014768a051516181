"""Inputs that must not go silently wrong, through the command line: eval's task, characters outside the
tokenizer's vocabulary, prompts over the context, numeric flags out of range; and one exit-status contract for
every command (errors on stderr; 2 usage error, 1 failure, 130 Ctrl-C after saving), also via python -m."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek import cli
from nanoseek.checkpoint import latest_checkpoint
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import CHARS, SPECIALS, UNK, Tokenizer, encode_checked

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--no-progress", "--steps", "1"]
EVAL = ["--n", "4", "--num-generations", "0", "--max-completion-length", "2"]


def _model_dir(path: Path, tok: Tokenizer, **overrides) -> Path:
    Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **overrides)).save_pretrained(path)
    tok.save(path)
    return path


def _char_tokenizer_without(missing: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + [c for c in CHARS if c not in missing])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok)


# ---------------------------------------------------------------------- eval's task
def test_eval_takes_the_task_the_run_trained_on(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["pretrain", *TRAIN, "--task", "arithmetic", "--out", str(run)]) == 0
    for model in (latest_checkpoint(run), run):  # a checkpoint or its run directory
        assert cli.main(["eval", "--model", str(model), *EVAL, "--json", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["task"] == "arithmetic"
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(run), *EVAL, "--task", "countdown"]) == 0
    assert "the model was trained on arithmetic" in capsys.readouterr().err


def test_eval_without_a_recorded_task_requires_task(tmp_path, capsys):
    model = _model_dir(tmp_path / "m", Tokenizer.char())
    assert cli.main(["eval", "--model", str(model), *EVAL]) == 2
    captured = capsys.readouterr()
    assert "does not record a built-in task" in captured.err and "--task" in captured.err and not captured.out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    run = tmp_path / "sft"
    assert cli.main(["sft", *TRAIN, "--data", str(pairs), "--out", str(run)]) == 0  # files, not a task
    assert cli.main(["eval", "--model", str(run), *EVAL]) == 2
    assert "does not record a built-in task" in capsys.readouterr().err


# ---------------------------------------------------------------------- characters outside the vocabulary
def test_unknown_characters_in_data_are_an_error_naming_file_and_line(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
                     + json.dumps({"prompt": "café 2+2=", "completion": "4 ½"}) + "\n")
    assert cli.main(["sft", *TRAIN, "--data", str(pairs), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{pairs}:2 (prompt): 1 character(s) outside the tokenizer's vocabulary" in err
    assert "'é' (U+00E9)" in err and "--allow-unknown-chars" in err and not (tmp_path / "a").exists()
    assert cli.main(["sft", *TRAIN, "--data", str(pairs), "--out", str(tmp_path / "b"), "--allow-unknown-chars"]) == 0
    text = tmp_path / "corpus.txt"
    text.write_text("one two three\nfour five\nsix\tseven\n" * 3)
    assert cli.main(["pretrain", *TRAIN, "--data", str(text), "--seq-len", "8", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{text}:3: 3 character(s)" in err and "'\\t' (U+0009)" in err


def test_unknown_characters_and_overlong_prompts_in_eval_and_prompts(tmp_path, capsys):
    tok = _char_tokenizer_without("0")
    with pytest.raises(ValueError, match=r"prompt '10\+20=': 2 character\(s\) outside.*'0' \(U\+0030\)"):
        encode_checked(tok, "10+20=", "prompt '10+20='")
    assert encode_checked(tok, "10+20=", "p", allow_unknown=True).count(tok.unk_id) == 2
    with pytest.raises(ValueError, match="prompt 'abc': 3 tokens, more than the model's context of 2"):
        encode_checked(Tokenizer.char(), "abc", "prompt 'abc'", max_tokens=2)
    with pytest.raises(ValueError, match="unpaired surrogate"):
        encode_checked(Tokenizer.char(), "a\ud800", "prompt 1")
    no_zero = _model_dir(tmp_path / "no_zero", tok)
    assert cli.main(["eval", "--model", str(no_zero), "--task", "arithmetic", *EVAL, "--n", "50"]) == 2
    assert "task 'arithmetic' prompt" in capsys.readouterr().err
    short = _model_dir(tmp_path / "short", Tokenizer.char(), max_position_embeddings=4)
    assert cli.main(["eval", "--model", str(short), "--task", "countdown", *EVAL]) == 2
    assert "more than the model's context of 4 (max_position_embeddings)" in capsys.readouterr().err


def test_generate_refuses_unknown_characters_and_prompts_over_the_context(tmp_path, capsys):
    no_zero = _model_dir(tmp_path / "no_zero", _char_tokenizer_without("0"))
    assert cli.main(["generate", "--model", str(no_zero), "--prompt", "10+2=", "--max-completion-length", "2"]) == 2
    assert "--prompt 1: 1 character(s) outside the tokenizer's vocabulary" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(no_zero), "--prompt", "10+2=", "--max-completion-length", "2",
                     "--allow-unknown-chars"]) == 0
    short = _model_dir(tmp_path / "short", Tokenizer.char(), max_position_embeddings=8)
    assert cli.main(["generate", "--model", str(short), "--prompt", "1+2=", "--max-completion-length", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(short), "--prompt", "1+2=", "--max-completion-length", "4"]) == 2
    assert "5 tokens leave room for 3 new tokens in the model's context of 8" in capsys.readouterr().err


# ---------------------------------------------------------------------- numeric flags
@pytest.mark.parametrize(("argv", "flag"), [
    (["pretrain", "--save-every", "-1"], "--save-every"),
    (["pretrain", "--stop-at", "0"], "--stop-at"),
    (["sft", "--steps", "0"], "--steps"),
    (["pretrain", "--lr", "-1"], "--lr"),
    (["eval", "--model", "m", "--num-generations", "-1"], "--num-generations"),
    (["eval", "--model", "m", "--n", "0"], "--n"),
    (["eval", "--model", "m", "--max-completion-length", "0"], "--max-completion-length"),
    (["eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--temperature", "0"], "--temperature"),
    (["demo", "--threads", "0"], "--threads"),
])
def test_numeric_flags_are_range_checked_at_start(tmp_path, capsys, argv, flag):
    out = ["--out", str(tmp_path / "run")] if argv[0] != "eval" else []
    assert cli.main([*argv, *out]) == 2
    captured = capsys.readouterr()
    assert flag in captured.err and not captured.out
    assert not (tmp_path / "run").exists()


def test_info_flags_come_from_a_dataclass_with_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = capsys.readouterr().out
    assert "(default: small)" in out and "(default: 16)" in out
    assert cli.main(["info", "--preset", "tiny", "--seq-len", "0"]) == 2
    assert "--seq-len 0: must be >= 1" in capsys.readouterr().err
    assert cli.main(["info", "--preset", "tiny", "--seq-len", "4"]) == 0
    assert "logits (1, 4, 256)" in capsys.readouterr().out


# ---------------------------------------------------------------------- exit statuses, stderr, python -m
def test_python_m_nanoseek_runs_the_cli_with_errors_on_stderr_and_status_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "nanoseek", "prepare", "--data", "x.txt", "--vocab-size", "10"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and not done.stdout
    assert "nanoseek prepare: error: --vocab-size 10: must be >= 260" in done.stderr


def test_a_failure_exits_1_with_the_traceback(monkeypatch, tmp_path, capsys):
    import nanoseek.report

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(nanoseek.report, "plot_metrics", boom)
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "nanoseek plot: failed: RuntimeError: disk on fire" in err


def test_ctrl_c_saves_then_exits_130(monkeypatch, tmp_path, capsys):
    import nanoseek.evaluate
    import nanoseek.train.pretrain as pretrain

    lr_at = pretrain.lr_at

    def ctrl_c_in_step_2(step, *args):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *args)

    monkeypatch.setattr(pretrain, "lr_at", ctrl_c_in_step_2)
    run = tmp_path / "run"
    assert cli.main(["pretrain", *TRAIN, "--steps", "5", "--out", str(run)]) == 130
    assert latest_checkpoint(run).name == "step_00000002"  # the step in flight finished and was saved
    assert "continue with --resume" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nanoseek.evaluate, "evaluate", interrupted)
    assert cli.main(["eval", "--model", str(run), *EVAL]) == 130
