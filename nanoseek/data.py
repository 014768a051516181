"""Training data: built-in tasks, local text and JSONL files, as (input, target) batches.

Two modes share one batch format (targets are -100 where no loss is taken):
- ``pretrain``: a token stream (documents joined, each ``bos ... eos``) packed into rows of T+1 tokens;
- ``sft``: one (prompt, completion) pair per row, ``bos + prompt + completion + eos``, right-padded, with the
  loss on the completion and eos only.

Every batch is a pure function of (seed, step): the data position of a resumed run is just its step, and each
rank builds the same global batch and takes its own rows of it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.tasks import Example, get_task, in_eval_split
from nanoseek.tokenizer import Tokenizer, encode_checked

IGNORE = -100  # target id that takes no loss (torch cross_entropy's ignore_index)


@dataclass
class LMBatch:
    """Language-model rows: inputs and their next-token targets (pretraining and SFT)."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T); targets[:, i] is the token after input_ids[:, i], or IGNORE

    def rows(self, index: slice) -> LMBatch:
        return LMBatch(self.input_ids[index], self.targets[index])

    def to(self, device: torch.device) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.targets.to(device))


@dataclass(frozen=True)
class Record:
    """One document (``text``) or one (prompt, completion) pair, with where it came from for error messages."""

    where: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    whole_file: bool = False  # ``text`` is a whole plain-text file (``where`` its path, no line)


# ---------------------------------------------------------------------- reading files
def read_records(paths: list[str | Path]) -> list[Record]:
    """Read ``.jsonl`` files (one object per line: {"text"} or {"prompt", "completion"}) and plain text files
    (one document each). Missing/empty files and malformed lines raise ValueError naming file:line."""
    if not paths:
        raise ValueError("no data files given: pass --data FILE (.txt or .jsonl) or --task NAME")
    records: list[Record] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"data file {p} not found: pass an existing .txt or .jsonl file to --data")
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            data = p.read_bytes()
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{p}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save the "
                             "file as UTF-8") from None
        if not raw.strip():
            raise ValueError(f"data file {p} is empty: it needs text (or JSONL records) to train on")
        if p.suffix != ".jsonl":
            records.append(Record(where=str(p), text=raw, whole_file=True))
            continue
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                 'object like {"text": "..."} or {"prompt": "...", "completion": "..."}') from None
            strings = {k for k, v in obj.items() if isinstance(v, str)} if isinstance(obj, dict) else set()
            if "text" in strings:
                records.append(Record(where=where, text=obj["text"]))
            elif {"prompt", "completion"} <= strings:
                records.append(Record(where=where, prompt=obj["prompt"], completion=obj["completion"]))
            else:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f'{where}: expected a "text" string or "prompt" and "completion" strings, got {keys}')
    return records


# ---------------------------------------------------------------------- row builders
def sft_row(tok: Tokenizer, prompt: str, completion: str, where: str | None = None,
            allow_unknown: bool = False, add_bos: bool = True, add_eos: bool = True) -> tuple[list[int], int]:
    """bos + prompt + completion + eos, and the number of leading tokens that take no loss (bos + prompt).
    With ``where`` (a file:line), characters the tokenizer lacks are an error naming it unless ``allow_unknown``.
    ``add_bos`` / ``add_eos`` False: a chat template already wrote them."""
    if where is None:
        p = tok.encode(prompt, add_bos=add_bos)
        return p + tok.encode(completion, add_eos=add_eos), len(p)
    p = encode_checked(tok, prompt, f"{where} (prompt)", add_bos=add_bos, allow_unknown=allow_unknown)
    c = encode_checked(tok, completion, f"{where} (completion)", add_eos=add_eos, allow_unknown=allow_unknown)
    return p + c, len(p)


def pad_rows(rows: list[tuple[list[int], int]], pad_id: int) -> LMBatch:
    """[(tokens, n_prompt)] -> right-padded batch; the loss covers tokens[n_prompt:] (completion + eos)."""
    T = max(len(t) for t, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (toks, n_prompt) in enumerate(rows):
        t = torch.tensor(toks)
        inputs[b, : len(t) - 1] = t[:-1]
        targets[b, n_prompt - 1 : len(t) - 1] = t[n_prompt:]
    return LMBatch(inputs, targets)


def pack_rows(stream: list[int], batch_size: int, seq_len: int) -> LMBatch:
    """The first batch_size·(seq_len+1) tokens of ``stream`` as rows: inputs t[:-1], targets t[1:]."""
    rows = torch.tensor(stream[: batch_size * (seq_len + 1)], dtype=torch.long).view(batch_size, seq_len + 1)
    return LMBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


# ---------------------------------------------------------------------- sources
class TaskData:
    """Fresh examples of a built-in task every step (train split only), seeded by (seed, step)."""

    def __init__(self, task: str, tok: Tokenizer, mode: str, seq_len: int, seed: int = 0):
        self.task, self.tok, self.mode, self.seq_len, self.seed = get_task(task), tok, mode, seq_len, seed
        longest = max(len(sft_row(tok, e.prompt, e.completion)[0]) for e in self._draw(random.Random(0), 256))
        if mode == "sft" and longest - 1 > seq_len:
            raise ValueError(f"task {task!r} examples reach {longest - 1} tokens but --seq-len is {seq_len}; "
                             f"raise --seq-len to at least {longest - 1}")

    def _draw(self, rng: random.Random, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            ex = self.task.example(rng)
            if not in_eval_split(ex.prompt, self.task):  # never train on a held-out prompt
                out.append(ex)
        return out

    def batch(self, step: int, batch_size: int) -> LMBatch:
        rng = random.Random(f"{self.task.name}/{self.seed}/{step}")
        if self.mode == "sft":
            rows = [sft_row(self.tok, e.prompt, e.completion) for e in self._draw(rng, batch_size)]
            return pad_rows(rows, self.tok.pad_id)
        stream: list[int] = []
        while len(stream) < batch_size * (self.seq_len + 1):
            e = self._draw(rng, 1)[0]
            stream += self.tok.encode(e.prompt + e.completion, add_bos=True, add_eos=True)
        return pack_rows(stream, batch_size, self.seq_len)


class FileData:
    """Local files: packed chunks of the document stream (pretrain) or padded pairs (sft), reshuffled each epoch."""

    def __init__(self, paths: list[str | Path], tok: Tokenizer, mode: str, seq_len: int, seed: int = 0,
                 allow_unknown_chars: bool = False):
        self.tok, self.mode, self.seq_len, self.seed = tok, mode, seq_len, seed
        records = read_records(paths)
        if mode == "sft":
            self.rows = []
            for r in records:
                if r.prompt is None:
                    raise ValueError(f'{r.where}: sft needs {{"prompt", "completion"}} records, got a text document')
                toks, n_prompt = sft_row(tok, r.prompt, r.completion, r.where, allow_unknown_chars)
                if len(toks) - 1 > seq_len:
                    raise ValueError(f"{r.where}: example has {len(toks) - 1} tokens, more than --seq-len {seq_len}; "
                                     "raise --seq-len or shorten the example")
                self.rows.append((toks, n_prompt))
            self.n = len(self.rows)
        else:
            stream: list[int] = []
            for r in records:
                text = r.text if r.text is not None else r.prompt + r.completion
                stream += encode_checked(tok, text, r.where, add_bos=True, add_eos=True,
                                         allow_unknown=allow_unknown_chars, is_file=r.whole_file)
            self.stream = stream
            self.n = (len(stream) - 1) // seq_len  # chunk i: tokens [i·T, i·T + T]
            if self.n < 1:
                raise ValueError(f"data {', '.join(map(str, paths))} has {len(stream)} tokens, too few for one "
                                 f"sequence of --seq-len {seq_len}; add text or lower --seq-len")

    def _index(self, i: int) -> int:
        """Global sample number -> item of this epoch's permutation."""
        epoch, j = divmod(i, self.n)
        perm = list(range(self.n))
        random.Random(f"{self.seed}/{epoch}").shuffle(perm)
        return perm[j]

    def batch(self, step: int, batch_size: int) -> LMBatch:
        items = [self._index(step * batch_size + b) for b in range(batch_size)]
        if self.mode == "sft":
            return pad_rows([self.rows[i] for i in items], self.tok.pad_id)
        T = self.seq_len
        stream = [t for i in items for t in self.stream[i * T : i * T + T + 1]]
        return pack_rows(stream, batch_size, T)


class DatasetData(FileData):
    """SFT rows of a dataset (``nanoseek.datasets.load_prompts``): prompt + completion, or ``messages``.
    Conversational rows (and every row with ``system_prompt``) are rendered with the tokenizer's chat template
    (``nanoseek.chat.sft_texts``): the completion ends with the template's own end of turn, so no second EOS is
    added, and the BOS is not doubled when the template writes one."""

    def __init__(self, source: str, tok: Tokenizer, seq_len: int, seed: int = 0, *, config: str | None = None,
                 split: str = "train", prompt_column: str = "prompt", completion_column: str = "completion",
                 messages_column: str = "messages", system_prompt: str | None = None,
                 allow_unknown_chars: bool = False):
        from nanoseek.chat import chat_template, sft_texts
        from nanoseek.datasets import load_prompts

        self.tok, self.mode, self.seq_len, self.seed = tok, "sft", seq_len, seed
        ds = load_prompts(source, config=config, split=split, prompt_column=prompt_column,
                          completion_column=completion_column, messages_column=messages_column,
                          require_completion=True)
        chat = system_prompt is not None or any(r.conversational or not isinstance(r.completion, str)
                                                for r in ds.rows)
        template = chat_template(tok) if chat else None
        self.rows = []
        for r in ds.rows:
            prompt, completion, add_eos = sft_texts(template, r.prompt, r.completion, system_prompt)
            toks, n_prompt = sft_row(tok, prompt, completion, r.where, allow_unknown_chars,
                                     add_bos=tok.adds_bos(prompt), add_eos=add_eos)
            if len(toks) - 1 > seq_len:
                raise ValueError(f"{r.where}: example has {len(toks) - 1} tokens, more than --seq-len {seq_len}; "
                                 "raise --seq-len or shorten the example")
            self.rows.append((toks, n_prompt))
        self.n = len(self.rows)


def make_data(mode: str, tok: Tokenizer, seq_len: int, seed: int, task: str | None = None,
              files: list[str] | None = None, allow_unknown_chars: bool = False) -> TaskData | FileData:
    if mode not in ("pretrain", "sft"):
        raise ValueError(f"mode must be 'pretrain' or 'sft', got {mode!r}")
    if files:
        return FileData(files, tok, mode, seq_len, seed, allow_unknown_chars)
    if task:
        return TaskData(task, tok, mode, seq_len, seed)
    raise ValueError("no training data: pass --task NAME (a built-in task) or --data FILE")
