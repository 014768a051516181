"""Fill-in-the-middle (DeepSeek-Coder, arXiv 2401.14196 §3.1; Bavarian et al. 2022, arXiv 2207.14255): a document
split at two random characters into prefix, middle and suffix is trained as
PSM ``<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle`` or
SPM ``<｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle`` (Bavarian et al. §3 and appendix D),
so the model learns to write the middle given both sides.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanoseek.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nanoseek.evaluate import EvalConfig
    from nanoseek.model.transformer import Transformer

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


def infill_prompt(prefix: str, suffix: str, tok: Tokenizer, mode: str = "psm", max_tokens: int | None = None
                  ) -> list[int]:
    """The ids that ask for the middle between ``prefix`` and ``suffix`` (the FIM format up to the middle); with
    ``max_tokens``, the prefix's start and the suffix's end are cut so that the prompt fits."""
    if mode not in MODES:
        raise ValueError(f"FIM mode {mode!r}: expected one of {MODES}")
    begin, hole, end = sentinel_ids(tok)
    before, after = encode_text(tok, prefix), encode_text(tok, suffix)
    if max_tokens is not None:  # the suffix gets half the budget, or what the prefix leaves
        budget = max(max_tokens - 3, 0)
        keep_after = min(len(after), max(budget // 2, budget - len(before)))
        keep_before = min(len(before), budget - keep_after)
        before, after = before[len(before) - keep_before:], after[:keep_after]
    if mode == "psm":
        return [begin, *before, hole, *after, end]
    return [begin, hole, *after, end, *before]


def encode_document(text: str, tok: Tokenizer, rng: random.Random, rate: float, mode: str) -> list[int]:
    """``text``'s ids, in FIM format with probability ``rate`` (split at two uniform character positions), else
    plain. No BOS or EOS: the caller separates documents."""
    if rng.random() >= rate:
        return encode_text(tok, text)
    start, stop = sorted(rng.randint(0, len(text)) for _ in range(2))
    return infill_prompt(text[:start], text[stop:], tok, mode) + encode_text(tok, text[start:stop])


def line_infill_exact_match(model: Transformer, tok: Tokenizer, documents: list[str], mode: str, seed: int,
                            max_new: int, batch_size: int) -> dict:
    """Single-line infilling (DeepSeek-Coder §3.1's benchmark): in each document one non-empty line, picked by a
    ``seed``ed rng, is the hole; the greedy middle up to the end sentinel, EOS or a newline is exact when it equals
    the line (surrounding spaces ignored). -> {"exact_match", "n", "results": [{line, infilled, exact}]}."""
    from nanoseek.generate import generate

    rng, cases = random.Random(seed), []
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        filled = [i for i, line in enumerate(lines) if line.strip()]
        if filled:
            i = rng.choice(filled)
            line = lines[i].rstrip("\n")
            cases.append((line, "".join(lines[:i]), lines[i][len(line):] + "".join(lines[i + 1:])))
    budget = model.config.max_position_embeddings - max_new
    prompts = [infill_prompt(prefix, suffix, tok, mode, budget) for _, prefix, suffix in cases]
    stops = (*tok.stop_ids, sentinel_ids(tok)[2])
    outputs = [out for start in range(0, len(prompts), batch_size)
               for out in generate(model, prompts[start:start + batch_size], max_new, stop_token_ids=stops)]
    results = []
    for (line, _, _), out in zip(cases, outputs):
        infilled = tok.decode(out).split("\n", 1)[0]
        results.append({"line": line, "infilled": infilled, "exact": infilled.strip() == line.strip()})
    return {"exact_match": sum(r["exact"] for r in results) / max(len(results), 1), "n": len(results),
            "results": results}


def run_eval(cfg: EvalConfig, directory: Path) -> int:
    """``nanoseek eval --fim --data-dir SHARDS``: ``line_infill_exact_match`` on the first ``--n`` documents of the
    shards' val split (``bos ids eos`` each)."""
    from nanoseek.distributed import device_of
    from nanoseek.model.transformer import Transformer

    if not cfg.data_dir:
        raise ValueError("--fim needs --data-dir: the shards of `nanoseek prepare` whose val split to infill")
    tok = Tokenizer.load(directory)
    shards = Path(cfg.data_dir)
    ids = np.fromfile(shards / "val.bin", dtype=json.loads((shards / "index.json").read_text())["dtype"])
    ends = np.flatnonzero(ids == tok.eos_id)[: cfg.n]
    documents = [tok.decode(ids[start:stop].tolist()) for start, stop in zip(np.r_[0, ends[:-1] + 1], ends)]
    model = Transformer.from_pretrained(directory).to(device_of(cfg.device))
    result = {"model": str(directory), "data_dir": cfg.data_dir, "mode": cfg.fim_mode, **line_infill_exact_match(
        model, tok, documents, cfg.fim_mode, cfg.seed, cfg.max_completion_length, cfg.batch_size)}
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return 0
