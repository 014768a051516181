"""Fuzzing ``nanoseek sft/pretrain --data`` with mutated data files (hypothesis): every outcome is a finished
run (exit 0) or one clear error line naming the file (and the line, for a bad line) with exit 2, never a
traceback. Bounded: a fixed number of derandomized examples on a tiny model, one step each."""

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import cli

VALID = [{"prompt": "12+3=", "completion": "15"}, {"prompt": "7*6=", "completion": "42"},
         {"text": "a short document\nover two lines"}, {"prompt": "9-4=", "completion": "5"}]
VALUES = st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=True), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# a line that replaces a valid one: any JSON value, an object with odd keys/values, or raw text
LINES = st.one_of(
    VALUES.map(json.dumps),
    st.dictionaries(st.sampled_from(["prompt", "completion", "text", "x"]), VALUES, max_size=3).map(json.dumps),
    st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(suffix, content): a valid JSONL or text file, then a few mutations of its lines or bytes."""
    suffix = draw(st.sampled_from([".jsonl", ".txt"]))
    lines = [json.dumps(r) for r in VALID] if suffix == ".jsonl" else ["1+2=3", "some plain text", "x" * 40]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if op == "replace" and lines:
            lines[i] = draw(LINES)
        elif op == "insert":
            lines.insert(i, draw(LINES))
        elif op == "delete" and lines:
            del lines[i]
        elif op == "truncate" and lines:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    content = "\n".join(lines).encode("utf-8", errors="surrogatepass") + draw(st.sampled_from([b"", b"\n"]))
    if draw(st.booleans()):  # raw bytes: invalid UTF-8, NULs, a BOM, CRLF, ...
        at = draw(st.integers(0, len(content)))
        junk = draw(st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from([b"\xef\xbb\xbf", b"\r\n", b"\x00"])))
        content = content[:at] + junk + content[at:]
    return suffix, content


def run_on(command: str, suffix: str, content: bytes) -> int:
    """``nanoseek COMMAND --data FILE`` on these bytes: no traceback, status 0 or 2, and an error (status 2) names
    the file (with its line, or why the whole file is unusable). Returns the status."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            rc = cli.main([command, "--data", str(path), "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                           "--seq-len", "24", "--no-progress", "--out", str(Path(tmp) / "run")])
        text = err.getvalue()
        assert "Traceback" not in text, text
        assert rc in (0, 2), text
        if rc == 2:
            message = text.strip().splitlines()[-1]
            assert message.startswith(f"nanoseek {command}: error: "), text
            assert str(path) in message, message
            located = re.search(re.escape(str(path)) + r":\d+", message)
            file_level = any(s in message for s in ("is empty", "too few for one sequence", "got a text document"))
            assert located or file_level, message
        return rc


@pytest.mark.parametrize("command, suffix, content", [
    ("sft", ".jsonl", b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": 1'),  # a torn JSON line
    ("sft", ".jsonl", b'{"prompt": "1+1=", "completion": "2"}\n\xff\xfe\n'),  # not UTF-8
    ("pretrain", ".txt", b""),  # empty
])
def test_known_bad_data_files_are_errors_naming_the_file(command, suffix, content):
    assert run_on(command, suffix, content) == 2  # the error-message checks of run_on ran


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["sft", "pretrain"]), file=data_files())
def test_mutated_data_files_give_clear_errors(command, file):
    run_on(command, *file)
