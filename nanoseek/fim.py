"""Fill-in-the-middle (DeepSeek-Coder, arXiv 2401.14196 §3.1; Bavarian et al. 2022, arXiv 2207.14255): a document
split at two random characters into prefix, middle and suffix is trained as
PSM ``<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle`` or
SPM ``<｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle`` (Bavarian et al. §3 and appendix D)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from nanoseek.tokenizer import Tokenizer

SENTINELS: tuple[str, str, str] = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
MODES = ("psm", "spm")


def sentinel_ids(tok: Tokenizer) -> tuple[int, int, int]:
    ids = [tok.tok.token_to_id(s) for s in SENTINELS]
    if None in ids:
        raise ValueError(f"tokenizer lacks {SENTINELS}: use one from nanoseek prepare, which adds the FIM sentinels")
    return ids[0], ids[1], ids[2]


def infill_prompt(prefix: str, suffix: str, tok: Tokenizer, mode: str = "psm", max_tokens: int | None = None
                  ) -> list[int]:
    """The FIM ids up to the middle; ``max_tokens`` cuts the prefix's start and the suffix's end so that they fit."""
    if mode not in MODES:
        raise ValueError(f"FIM mode {mode!r}: expected one of {MODES}")
    begin, hole, end = sentinel_ids(tok)
    before, after = tok.encode(prefix), tok.encode(suffix)
    if max_tokens is not None:  # the suffix gets half the budget, or what the prefix leaves
        budget = max(max_tokens - 3, 0)
        keep_after = min(len(after), max(budget // 2, budget - len(before)))
        keep_before = min(len(before), budget - keep_after)
        before, after = before[len(before) - keep_before:], after[:keep_after]
    return [begin, *before, hole, *after, end] if mode == "psm" else [begin, hole, *after, end, *before]


def encode_document(text: str, tok: Tokenizer, rng: random.Random, rate: float, mode: str) -> list[int]:
    """``text``'s ids, FIM at probability ``rate`` (two uniform split points), else plain; no BOS/EOS (the caller's)."""
    if rng.random() >= rate:
        return tok.encode(text)
    start, stop = sorted(rng.randint(0, len(text)) for _ in range(2))
    return infill_prompt(text[:start], text[stop:], tok, mode) + tok.encode(text[start:stop])


def val_documents(data_dir: str | Path, tok: Tokenizer, n: int | None = None) -> list[str]:
    """The text of the first ``n`` (None: all) documents of ``nanoseek prepare``'s val shard (``bos ids eos`` each)."""
    index = json.loads((Path(data_dir) / "index.json").read_text())
    ids = np.fromfile(Path(data_dir) / "val.bin", dtype=index["dtype"])
    ends = np.flatnonzero(ids == tok.eos_id)[:n]
    return [tok.decode(ids[start:stop].tolist()) for start, stop in zip(np.r_[0, ends[:-1] + 1], ends)]
