"""Token batches from built-in tasks, records (``nanoseek.datasets``) or shards (``nanoseek prepare``): pretraining
reads rows of T+1 tokens from a stream of ``bos ... eos`` documents; SFT right-pads one ``bos + prompt + completion +
eos`` row per example, the loss on completion and eos (IGNORE targets elsewhere). Every batch is a pure function of
(seed, step), so a resumed run continues at its step and each rank takes its rows of the same batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import decoders

from nanoseek.corpus import read_index
from nanoseek.datasets import Row, TaskPrompts, epoch_indices, load_prompts
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
    """SFT rows as (tokens, n_prompt), the loss on tokens[n_prompt:] (``Tokenizer.sft_texts``); unknown characters
    (unless ``allow_unknown_chars``) and rows over seq_len + 1 tokens are errors naming the row."""
    out = []
    for r in rows:
        prompt, completion, plain = tok.sft_texts(r.prompt, r.completion, system_prompt)
        kw = {"allow_unknown": allow_unknown_chars, "parse_specials": not plain}  # a rendered template's specials
        p = encode_checked(tok, prompt, f"{r.where} (prompt)", add_bos=True, **kw)
        toks = p + encode_checked(tok, completion, f"{r.where} (completion)", add_eos=plain, **kw)
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


def pack_rows(rows: torch.Tensor | np.ndarray) -> LMBatch:
    """Rows of seq_len + 1 tokens as inputs t[:-1] and targets t[1:]."""
    rows = torch.as_tensor(rows.astype(np.int64) if isinstance(rows, np.ndarray) else rows)
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
                return pack_rows(torch.tensor(stream[: batch_size * (self.seq_len + 1)]).view(batch_size, -1))


class ShardData:
    """Pretraining on memory-mapped ``nanoseek prepare`` shards: chunk i is train tokens [i·T, i·T + T], visited once
    per epoch in a seeded affine order (i -> a·i + b mod n) that holds nothing per chunk, so memory stays flat."""

    def __init__(self, directory: str | Path, tok: Tokenizer, seq_len: int, seed: int = 0):
        self.directory, self.seq_len, self.seed = Path(directory), seq_len, seed
        self.dtype = read_index(directory, tok)["dtype"]
        self.train = np.memmap(self.directory / "train.bin", dtype=self.dtype, mode="r")
        self.n = (len(self.train) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"shards {directory} have {len(self.train)} train tokens, too few for one sequence of "
                             f"--seq-len {seq_len}; add text or lower --seq-len")
        self.token_bytes = token_bytes(tok)

    def batch(self, step: int, batch_size: int) -> LMBatch:
        T = self.seq_len
        starts = [self.chunk(step * batch_size + i) * T for i in range(batch_size)]
        return pack_rows(np.stack([self.train[s : s + T + 1] for s in starts]))

    def chunk(self, i: int) -> int:
        """The chunk at position ``i`` of the seeded order (epoch i // n)."""
        epoch, i = divmod(i, self.n)
        a, b = _affine(f"{self.seed}/{epoch}", self.n)
        return (a * i + b) % self.n

    def validation(self, n_tokens: int) -> LMBatch:
        """The first ``n_tokens`` of the val split (at least one row) as rows of seq_len + 1 tokens."""
        val = np.memmap(self.directory / "val.bin", dtype=self.dtype, mode="r")
        rows = min(max(n_tokens, self.seq_len + 1), len(val)) // (self.seq_len + 1)
        if rows < 1:
            raise ValueError(f"the val split of {self.directory} has {len(val)} tokens, fewer than one row of "
                             f"--seq-len {self.seq_len} + 1; lower --seq-len or prepare with a higher --val-per-mille")
        return pack_rows(val[: rows * (self.seq_len + 1)].reshape(rows, -1))


@lru_cache(maxsize=4)
def _affine(key: str, n: int) -> tuple[int, int]:
    rng = random.Random(key)
    a = 1
    while n > 2 and (a == 1 or math.gcd(a, n) != 1):
        a = rng.randrange(2, n)
    return a, rng.randrange(n)


def token_bytes(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes of each token id's text, 0 for special tokens (a byte-level BPE piece has one byte a character)."""
    byte_level = isinstance(tok.tok.decoder, decoders.ByteLevel)
    specials = {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}
    table = torch.zeros(tok.vocab_size, dtype=torch.long)
    for piece, i in tok.tok.get_vocab().items():
        if i not in specials:
            table[i] = len(piece) if byte_level else len(piece.encode())
    return table


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Summed next-token nats over the UTF-8 bytes predicted, in bits per byte (comparable across tokenizers)."""
    return nats / math.log(2) / n_bytes


class SFTData:
    """SFT on prompt datasets (``nanoseek.datasets.load_prompts``: files, folders or a hub dataset) of prompt +
    completion or ``messages`` rows, tokenized by ``sft_rows``, padded per batch, reshuffled each epoch.
    ``load_kwargs``: ``load_prompts``'s (config, split, the column names)."""

    def __init__(self, sources: str | Path | list[str | Path], tok: Tokenizer, seq_len: int, seed: int = 0, *,
                 system_prompt: str | None = None, allow_unknown_chars: bool = False, **load_kwargs):
        self.pad_id, self.seed = tok.pad_id, seed
        sources = sources if isinstance(sources, list) else [sources]
        if not sources:
            raise ValueError("no data files given: pass --data FILE (.jsonl, .json, .csv or .parquet) or --task NAME")
        rows = [r for source in sources for r in load_prompts(source, require_completion=True, **load_kwargs).rows]
        self.rows = sft_rows(tok, rows, seq_len, system_prompt, allow_unknown_chars)

    def batch(self, step: int, batch_size: int) -> LMBatch:
        return pad_rows([self.rows[i] for i in epoch_indices(len(self.rows), step, batch_size, self.seed)], self.pad_id)


def make_data(mode: str, tok: Tokenizer, seq_len: int, seed: int, task: str | None = None,
              files: list[str] | None = None, allow_unknown_chars: bool = False,
              data_dir: str | Path | None = None) -> TaskData | ShardData | SFTData:
    """The batches of ``nanoseek pretrain`` / ``nanoseek sft``: prepared shards (``--data-dir``; pretraining on
    ``--data`` files prepares them first), SFT files (``--data``) or a built-in task."""
    if data_dir and mode == "sft":
        raise ValueError("--data-dir holds pretraining shards; sft trains on --data FILE or --dataset NAME")
    if data_dir:
        return ShardData(data_dir, tok, seq_len, seed)
    if files and mode == "sft":
        return SFTData(files, tok, seq_len, seed, allow_unknown_chars=allow_unknown_chars)
    if task:
        return TaskData(task, tok, mode, seq_len, seed)
    raise ValueError("no training data: pass --task NAME (a built-in task), --data FILE or --data-dir SHARDS")
