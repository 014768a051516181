"""Prompt datasets for RL, SFT, evaluation and sampling, in TRL's conventions: a row has a ``prompt`` (a string or
``{"role", "content"}`` messages), optionally a ``completion`` (the SFT target) and other columns (``answer``,
``tests``, ...) that reward functions receive as keyword lists; or the whole conversation in ``messages``. Sources:
local files, folders, a hub dataset or a built-in task; ``batch(step, n, seed)`` is a pure function of (seed, step).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from nanoseek.chat import check_messages
from nanoseek.tasks import Example, Task, distinct_examples, examples, in_eval_split

FORMATS = (".jsonl", ".json", ".parquet", ".csv")
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "eval", "dev")


@dataclass(frozen=True)
class Row:
    """One dataset row: ``columns`` are the other columns as rewards see them (the answer column as ``answer``)."""

    prompt: str | list[dict]
    completion: str | list[dict] | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    @property
    def answer(self) -> str | None:
        a = self.columns.get("answer")
        return None if a is None else str(a)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class PromptDataset:
    """Rows and the extra column names they carry (a row without one of them has None there)."""

    name: str
    rows: tuple[Row, ...]
    columns: frozenset[str]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, n: int, seed: int = 0, round_: int = 0) -> list[Row]:
        """The n rows of ``step`` (see ``epoch_indices``); ``round_`` > 0 is a dynamic-sampling redraw."""
        return [self.rows[i] for i in epoch_indices(len(self.rows), step, n, seed, round_)]

    def split(self, eval_fraction: int = 10) -> tuple[PromptDataset, PromptDataset]:
        """(train, held-out): one prompt in ``eval_fraction`` held out by a hash of its text (``in_eval_split``)."""
        held = [in_eval_split(json.dumps(r.prompt, sort_keys=True) if r.conversational else r.prompt,
                              fraction=eval_fraction) for r in self.rows]
        train, evals = (tuple(r for r, h in zip(self.rows, held) if h == side) for side in (False, True))
        if not train or not evals:
            raise ValueError(f"dataset {self.name}: {len(self.rows)} rows are too few to hold out one in "
                             f"{eval_fraction}; give an evaluation dataset")
        return (PromptDataset(f"{self.name}[train]", train, self.columns),
                PromptDataset(f"{self.name}[eval]", evals, self.columns))


@dataclass(frozen=True)
class TaskPrompts:
    """A built-in task behind ``PromptDataset``'s interface: a step's rows are ``nanoseek.tasks.examples`` drawn fresh
    from (seed, step, round), with columns ``answer`` and ``example`` (what the task's own reward reads)."""

    task: Task
    split: str = "train"
    columns: frozenset[str] = frozenset({"answer", "example"})

    @property
    def name(self) -> str:
        return f"task {self.task.name}"

    def batch(self, step: int, n: int, seed: int = 0, round_: int = 0) -> list[Row]:
        exs = examples(self.task, n, self.split, seed=(seed * 1_000_003 + step) * 101 + round_)
        return [_task_row(ex, self.task, self.split) for ex in exs]


def columns_of(rows: list[Row], names) -> dict[str, list]:
    """Columns ``names`` of ``rows`` as keyword lists aligned with the rows (None where a row lacks one)."""
    return {c: [r.columns.get(c) for r in rows] for c in sorted(names)}


def _task_row(ex: Example, task: Task, split: str) -> Row:
    return Row(ex.prompt, ex.completion, {"answer": ex.answer, "example": ex}, f"task {task.name} {split}")


def epoch_indices(n_items: int, step: int, size: int, seed: int = 0, round_: int = 0) -> list[int]:
    """The ``size`` item indices of ``step``: a fresh seeded shuffle of all ``n_items`` every epoch, each seen once
    per epoch (as TRL's sampler does); a pure function of (seed, step). ``round_`` > 0 walks another order."""
    out: list[int] = []
    while len(out) < size:
        epoch, offset = divmod(step * size + len(out), n_items)
        out += _epoch_order(f"{seed}/{round_}/{epoch}", n_items)[offset : offset + size - len(out)]
    return out


@lru_cache(maxsize=4)
def _epoch_order(key: str, n: int) -> tuple[int, ...]:
    """A seeded permutation of range(n), cached: consecutive steps walk the same epoch."""
    order = list(range(n))
    random.Random(key).shuffle(order)
    return tuple(order)


# ---------------------------------------------------------------------- reading records
def read_file(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each row of a FORMATS file; a bad file raises ValueError naming the file (and line)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'nanoseek[data]'") from None
        yield from ((f"{path} row {n}", obj) for n, obj in enumerate(pq.read_table(path).to_pylist(), start=1))
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"data file {path} is empty: it has no rows or text to read")
    if path.suffix == ".csv":
        yield from ((f"{path} row {n}", obj) for n, obj in enumerate(csv.DictReader(io.StringIO(text, newline="")), 1))
        return
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads text
    array = path.suffix == ".json" and text.lstrip().startswith("[")  # else JSON lines (in .json too, as `datasets`)
    chunks = [(1, text)] if array else [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    for n, chunk in chunks:
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n + e.lineno - 1}: malformed JSON ({e.msg} at column {e.colno}); give "
                             "one JSON object of columns per line, or a JSON list of them") from None
        for m, obj in enumerate(value if array else [value], start=1):
            where = f"{path} row {m}" if array else f"{path}:{n}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: a {type(obj).__name__}, expected a JSON object of columns")
            yield where, obj


def _split_of(path: Path) -> str:
    """The split a data file's name gives (``train-00000-of-00002.parquet`` -> ``train``), or ""."""
    name = path.stem.lower().replace("-", "_").replace(".", "_").split("_")[0]
    return name if name in SPLIT_NAMES else ""


def _data_files(path: Path, split: str) -> list[Path]:
    """The row files of a file or folder (in a folder of split-named files, those of ``split``)."""
    if path.is_file():
        if path.suffix not in FORMATS:
            raise ValueError(f"{path}: got a text document; prompt rows come from {', '.join(FORMATS)} files")
        if split != "train":
            raise ValueError(f"{path}: a single file has no {split!r} split; give a folder of train.jsonl, test.jsonl")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS)
    if not files:
        raise ValueError(f"{path}: no {', '.join(FORMATS)} files in this folder")
    splits = {_split_of(p) for p in files} - {""}
    if not splits:
        return files
    if split not in splits:
        raise ValueError(f"{path}: no files of split {split!r}; its files are named for {', '.join(sorted(splits))}")
    return [p for p in files if _split_of(p) == split]


def read_hub(name: str, config: str | None, split: str, streaming: bool = False) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} is not a local file or folder; hub datasets need the `datasets` "
                         "package: pip install 'nanoseek[data]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - hub/network/builder errors all mean: this dataset cannot be read
        raise ValueError(f"dataset {name!r} (config {config}, split {split}): not a local file or folder, and "
                         f"datasets.load_dataset failed: {type(e).__name__}: {e}") from None
    for n, obj in enumerate(ds, start=1):
        yield f"{name}[{split}] row {n}", obj


def _cell(obj: dict, column: str, where: str, csv_cell: bool, completion: bool = False) -> str | list[dict]:
    """A prompt, completion or messages cell: a string (only a completion may be empty: stop at once) or messages
    (only assistant ones in a completion). In a CSV file (only strings) a cell holding a JSON list is messages."""
    at, value = f"{where} column {column!r}", obj[column]
    if csv_cell and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{at}: starts like a JSON list of messages but does not parse") from None
    if value is None:
        raise ValueError(f"{at}: missing value (null)")
    if isinstance(value, str):
        if not value.strip() and not completion:
            raise ValueError(f"{at}: empty")
        return value
    if not isinstance(value, list):
        raise ValueError(f"{at}: a {type(value).__name__}; give a string or a list of {{'role', 'content'}} messages")
    check_messages(value, at)
    if completion and any(m["role"] != "assistant" for m in value):
        raise ValueError(f"{at}: a completion holds assistant messages only")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _make_row(obj: dict, where: str, prompt_column: str, completion_column: str, messages_column: str,
              answer_column: str | None, csv_cells: bool = False) -> Row:
    if prompt_column in obj:
        prompt = _cell(obj, prompt_column, where, csv_cells)
        has_completion = obj.get(completion_column) is not None
        completion = _cell(obj, completion_column, where, csv_cells, completion=True) if has_completion else None
        used = {prompt_column, completion_column}
    elif messages_column in obj:
        messages = _cell(obj, messages_column, where, csv_cells)
        if isinstance(messages, str) or all(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where} column {messages_column!r}: give a list of messages with a user or system "
                             "message before the reply")
        last_user = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
        prompt, completion = messages[: last_user + 1], messages[last_user + 1 :] or None
        used = {messages_column}
    else:
        raise ValueError(f"{where}: no column {prompt_column!r} (nor {messages_column!r}); the row has "
                         f"{', '.join(map(repr, obj)) or 'no columns'}: name the prompt column (--prompt-column)")
    columns = {k: v for k, v in obj.items() if k not in used}
    if answer_column is not None:
        if answer_column not in obj:
            raise ValueError(f"{where}: no answer column {answer_column!r}; the row has {', '.join(map(repr, obj))}")
        columns["answer"] = columns.pop(answer_column)
    return Row(prompt, completion, columns, where)


def load_prompts(source: str | Path, *, config: str | None = None, split: str = "train", prompt_column: str = "prompt",
                 answer_column: str | None = None, completion_column: str = "completion",
                 messages_column: str = "messages", require_completion: bool = False) -> PromptDataset:
    """Validated rows of a local file or folder (its files named by ``split`` if any are), else a hub dataset.
    ``answer_column``: every row's gold answer, ``answer`` to rewards; ``require_completion``: for SFT."""
    path = Path(source).expanduser()
    if path.exists():
        rows_in = ((*r, p.suffix == ".csv") for p in _data_files(path, split) for r in read_file(p))
    elif str(source).startswith((".", "/", "~")) or Path(source).suffix in FORMATS:
        raise ValueError(f"dataset {source}: no such file or folder")
    else:
        rows_in = ((*r, False) for r in read_hub(str(source), config, split))
    rows: list[Row] = []
    for where, obj, csv_cells in rows_in:
        row = _make_row(obj, where, prompt_column, completion_column, messages_column, answer_column, csv_cells)
        if require_completion and row.completion is None:
            raise ValueError(f"{where}: no completion; SFT rows need {prompt_column!r} + {completion_column!r}, "
                             f"or {messages_column!r} ending with an assistant message")
        rows.append(row)
    if not rows:
        raise ValueError(f"dataset {source} (split {split}): no rows")
    return PromptDataset(str(source), tuple(rows), frozenset(c for r in rows for c in r.columns))


def task_dataset(task: Task, n: int, split: str, seed: int = 0) -> PromptDataset:
    """Up to n distinct examples of a built-in task as a dataset, with its reference solutions as completions."""
    rows = tuple(_task_row(ex, task, split) for ex in distinct_examples(task, n, split, seed))
    return PromptDataset(f"{task.name}[{split}]", rows, frozenset({"answer", "example"}))
