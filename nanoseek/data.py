"""Token batches from built-in tasks or records (``nanoseek.datasets``): pretraining packs a stream of
``bos ... eos`` documents into rows of T+1 tokens; SFT right-pads one ``bos + prompt + completion + eos`` row per
example with the loss on completion and eos (targets are -100 where no loss is taken). Every batch is a pure
function of (seed, step), so a resumed run continues at its step and each rank takes its rows of the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.datasets import Row, TaskPrompts, epoch_indices, load_prompts, read_file
from nanoseek.tasks import draw, get_task
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


# ---------------------------------------------------------------------- row builders
def sft_rows(tok: Tokenizer, rows: Sequence[Row], seq_len: int, system_prompt: str | None = None,
             allow_unknown_chars: bool = False) -> list[tuple[list[int], int]]:
    """SFT rows as (tokens, n_prompt): the loss covers tokens[n_prompt:]. String rows are ``bos + prompt +
    completion + eos``; conversational rows (all rows, given a ``system_prompt``) go through the chat template
    (``Tokenizer.sft_texts``), whose end of turn replaces the eos. Unknown characters (unless
    ``allow_unknown_chars``) and rows over seq_len + 1 tokens are errors naming the row."""
    out = []
    for r in rows:
        prompt, completion, add_eos = tok.sft_texts(r.prompt, r.completion, system_prompt)
        p = encode_checked(tok, prompt, f"{r.where} (prompt)", add_bos=True, allow_unknown=allow_unknown_chars)
        toks = p + encode_checked(tok, completion, f"{r.where} (completion)", add_eos=add_eos,
                                  allow_unknown=allow_unknown_chars)
        if len(toks) - 1 > seq_len:
            raise ValueError(f"{r.where}: example has {len(toks) - 1} tokens, more than --seq-len {seq_len}; "
                             "raise --seq-len or shorten the example")
        out.append((toks, len(p)))
    return out


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
    """Fresh examples of a built-in task every step (train split only), drawn from (seed, step): SFT rows
    (``nanoseek.datasets.TaskPrompts``), or their text packed for pretraining."""

    def __init__(self, task: str, tok: Tokenizer, mode: str, seq_len: int, seed: int = 0):
        self.task = get_task(task)
        self.prompts = TaskPrompts(self.task)
        self.tok, self.mode, self.seq_len, self.seed = tok, mode, seq_len, seed
        if mode == "sft":
            sft_rows(tok, self.prompts.batch(0, 256), seq_len)  # the task's examples fit in seq_len

    def batch(self, step: int, batch_size: int) -> LMBatch:
        if self.mode == "sft":
            return pad_rows(sft_rows(self.tok, self.prompts.batch(step, batch_size, self.seed), self.seq_len),
                            self.tok.pad_id)
        stream: list[int] = []
        for e in draw(self.task, "train", seed=f"{self.seed}/{step}"):
            stream += self.tok.encode(e.prompt + e.completion, add_bos=True, add_eos=True)
            if len(stream) >= batch_size * (self.seq_len + 1):
                return pack_rows(stream, batch_size, self.seq_len)


def _paths(paths: list[str | Path]) -> list[Path]:
    if not paths:
        raise ValueError("no data files given: pass --data FILE (.txt, .jsonl, .json, .csv or .parquet) or --task NAME")
    return [Path(p) for p in paths]


class TextData:
    """Pretraining on files: their records' text (``text``, or ``prompt`` + ``completion``) joined into one stream
    of ``bos ... eos`` documents, served as chunks of seq_len + 1 tokens, reshuffled each epoch."""

    def __init__(self, paths: list[str | Path], tok: Tokenizer, seq_len: int, seed: int = 0,
                 allow_unknown_chars: bool = False):
        self.seq_len, self.seed = seq_len, seed
        stream: list[int] = []
        for p in _paths(paths):
            for where, obj in read_file(p):
                stream += encode_checked(tok, _document(obj, where), where, add_bos=True, add_eos=True,
                                         allow_unknown=allow_unknown_chars, is_file=where == str(p))
        self.stream = stream
        self.n = (len(stream) - 1) // seq_len  # chunk i: tokens [i·T, i·T + T]
        if self.n < 1:
            raise ValueError(f"data {', '.join(map(str, paths))} has {len(stream)} tokens, too few for one "
                             f"sequence of --seq-len {seq_len}; add text or lower --seq-len")

    def batch(self, step: int, batch_size: int) -> LMBatch:
        T, items = self.seq_len, epoch_indices(self.n, step, batch_size, self.seed)
        stream = [t for i in items for t in self.stream[i * T : i * T + T + 1]]
        return pack_rows(stream, batch_size, T)


def _document(obj: dict, where: str) -> str:
    if isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return obj["prompt"] + obj["completion"]
    raise ValueError(f'{where}: expected a "text" string or "prompt" and "completion" strings, got {sorted(obj)}')


class SFTData:
    """SFT on prompt datasets (``nanoseek.datasets.load_prompts``: files, folders or a hub dataset) of prompt +
    completion or ``messages`` rows, tokenized by ``sft_rows``, padded per batch, reshuffled each epoch."""

    def __init__(self, sources: str | Path | list[str | Path], tok: Tokenizer, seq_len: int, seed: int = 0, *,
                 system_prompt: str | None = None, allow_unknown_chars: bool = False, **load_kwargs):
        """``load_kwargs``: ``load_prompts``'s (config, split, the column names)."""
        self.pad_id, self.seed = tok.pad_id, seed
        rows = [r for source in _paths(sources if isinstance(sources, list) else [sources])
                for r in load_prompts(source, require_completion=True, **load_kwargs).rows]
        self.rows = sft_rows(tok, rows, seq_len, system_prompt, allow_unknown_chars)
        self.n = len(self.rows)

    def batch(self, step: int, batch_size: int) -> LMBatch:
        return pad_rows([self.rows[i] for i in epoch_indices(self.n, step, batch_size, self.seed)], self.pad_id)


def make_data(mode: str, tok: Tokenizer, seq_len: int, seed: int, task: str | None = None,
              files: list[str] | None = None, allow_unknown_chars: bool = False) -> TaskData | TextData | SFTData:
    """The batches of ``nanoseek pretrain`` / ``nanoseek sft``: local files (``--data``) or a built-in task."""
    if files:
        data = SFTData if mode == "sft" else TextData
        return data(files, tok, seq_len, seed, allow_unknown_chars=allow_unknown_chars)
    if task:
        return TaskData(task, tok, mode, seq_len, seed)
    raise ValueError("no training data: pass --task NAME (a built-in task) or --data FILE")
