"""Fill-in-the-middle (DeepSeek-Coder, arXiv 2401.14196 §3.1; Bavarian et al. 2022, arXiv 2207.14255): a document
split at two random characters into prefix, middle and suffix is trained as
PSM ``<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle`` or
SPM ``<｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle`` (Bavarian et al. §3 and appendix D),
so the model learns to write the middle given both sides.
"""

from __future__ import annotations

import random

from nanoseek.tokenizer import Tokenizer

SENTINELS: tuple[str, str, str] = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
MODES = ("psm", "spm")


def sentinel_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """The ids of the begin, hole and end sentinels; an error when the tokenizer lacks them."""
    ids = [tok.tok.token_to_id(s) for s in SENTINELS]
    if None in ids:
        raise ValueError(f"the tokenizer lacks the FIM sentinel tokens {SENTINELS}: prepare the corpus with "
                         "nanoseek prepare, which adds the FIM sentinels")
    return ids[0], ids[1], ids[2]


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """``text``'s ids with special-token strings inside it encoded as plain text, never as control tokens."""
    tok.tok.encode_special_tokens = True
    try:
        return tok.tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.tok.encode_special_tokens = False


def infill_prompt(prefix: str, suffix: str, tok: Tokenizer, mode: str = "psm") -> list[int]:
    """The ids that ask for the middle between ``prefix`` and ``suffix`` (the FIM format up to the middle)."""
    if mode not in MODES:
        raise ValueError(f"FIM mode {mode!r}: expected one of {MODES}")
    begin, hole, end = sentinel_ids(tok)
    if mode == "psm":
        return [begin, *encode_text(tok, prefix), hole, *encode_text(tok, suffix), end]
    return [begin, hole, *encode_text(tok, suffix), end, *encode_text(tok, prefix)]


def encode_document(text: str, tok: Tokenizer, rng: random.Random, rate: float, mode: str) -> list[int]:
    """``text``'s ids, in FIM format with probability ``rate`` (split at two uniform character positions), else
    plain. No BOS or EOS: the caller separates documents."""
    if rng.random() >= rate:
        return encode_text(tok, text)
    start, stop = sorted(rng.randint(0, len(text)) for _ in range(2))
    return infill_prompt(text[:start], text[stop:], tok, mode) + encode_text(tok, text[start:stop])
