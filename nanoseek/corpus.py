"""``nanoseek prepare``: a text corpus tokenized once into ``train.bin`` / ``val.bin`` (token ids, uint16 when the
vocabulary fits, else uint32; documents as ``bos ids eos``), the tokenizer and ``index.json`` (written last: shards
without an index are never read). A document goes to val when sha1(name) % 1000 < ``val_per_mille``, so adding
documents never moves another between splits. FIM (DeepSeek-Coder §3.1) applies to train documents only.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import random
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoseek import cli_args
from nanoseek.cli_args import option
from nanoseek.datasets import FORMATS, read_file, read_hub
from nanoseek.fim import MODES, SENTINELS, encode_document
from nanoseek.hf import atomic_write
from nanoseek.tokenizer import Tokenizer, encode_checked

SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrepareConfig:
    data: list[str] = option(default_factory=list, help="text, .jsonl, .json or .parquet files, folders, globs")
    out: str = option("data/corpus", "directory for the shards, index.json and the tokenizer")
    corpus: str | None = option(None, "a built-in corpus: this Python's standard library", choices=("python-stdlib",))
    dataset: str | None = option(None, "a Hugging Face dataset, streamed (needs the `datasets` package)")
    dataset_config: str | None = option(None, "the hub dataset's config")
    split: str = option("train", "the hub dataset's split")
    limit: int | None = option(None, "documents to take at most (a quick subset)", min=1)
    tokenizer: str | None = option(None, "directory with tokenizer.json (default: train a byte-level BPE)")
    vocab_size: int = option(4096, "BPE vocabulary when training one (+ the FIM sentinels)", min=260)
    val_per_mille: int = option(20, "documents per thousand held out for validation (0: none)", min=0, max=999)
    fim_rate: float = option(0.0, "fraction of train documents in fill-in-the-middle format", min=0, max=1)
    fim_mode: str = option("psm", "FIM order: prefix-suffix-middle or suffix-prefix-middle", choices=MODES)
    skip_bad_files: bool = option(False, "skip files that are not UTF-8 (default: an error naming the file)")
    allow_unknown_chars: bool = option(False, "let characters the tokenizer lacks become <unk>")
    workers: int = option(0, "tokenizing processes (0: one per CPU)", min=0)
    overwrite: bool = option(False, "replace the shards --out holds")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha1(tok.tok.to_str().encode()).hexdigest()


def read_index(directory: str | Path, tok: Tokenizer | None = None) -> dict:
    """``directory``'s index.json; with ``tok``, an error unless the shards were made with that tokenizer."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make shards with `nanoseek prepare --out {directory}` (an "
                                "interrupted prepare leaves no index)")
    index = json.loads(path.read_text())
    if tok is not None and index["tokenizer_sha1"] != tokenizer_hash(tok):
        raise ValueError(f"shards {directory} were made with another tokenizer than the model's: train with the "
                         f"tokenizer saved in {directory} (drop --tokenizer), or prepare again with --tokenizer DIR")
    if tok is not None and tok.vocab_size > np.iinfo(index["dtype"]).max + 1:
        raise ValueError(f"shards {directory} store {index['dtype']}, too narrow for {tok.vocab_size} tokens; "
                         "prepare again")
    return index


def _document(obj: dict, where: str) -> str:
    if isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return obj["prompt"] + obj["completion"]
    raise ValueError(f'{where}: expected a "text" string or "prompt" and "completion" strings, got {sorted(obj)}')


def _files(cfg: PrepareConfig) -> Iterator[tuple[str, Path]]:
    if cfg.corpus == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        yield from ((str(p.relative_to(root)), p) for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts)
    for source in cfg.data:
        matches = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
        if not matches:
            raise ValueError(f"{source} matches no files; check the pattern (quote it so the shell leaves it)")
        for m in map(Path, matches):
            if m.is_dir():
                yield from ((str(p), p) for p in sorted(m.rglob("*")) if p.is_file() and not any(
                    part.startswith(".") or part == "__pycache__" for part in p.relative_to(m).parts))
            elif m.is_file():
                yield str(m), m
            else:
                raise ValueError(f"data file {m} not found: pass an existing file, folder or glob")


def documents(cfg: PrepareConfig, skipped: dict[str, list[str]]) -> Iterator[tuple[str, str, bool]]:
    """(name, text, is a whole file) of each document; empty and skippable non-UTF-8 files go to ``skipped``."""
    for name, path in _files(cfg):
        raw = path.read_bytes()
        if not raw.strip():
            skipped["empty"].append(name)
            continue
        if path.suffix in FORMATS:
            yield from ((where, _document(obj, where), False) for where, obj in read_file(path))
            continue
        try:
            yield name, raw.decode("utf-8").replace("\r\n", "\n"), True
        except UnicodeDecodeError as e:
            if not (cfg.skip_bad_files or cfg.corpus):
                line = raw.count(b"\n", 0, e.start) + 1
                raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as UTF-8, "
                                 "or pass --skip-bad-files") from None
            skipped["not_utf8"].append(name)
    if cfg.dataset:
        rows = read_hub(cfg.dataset, cfg.dataset_config, cfg.split, streaming=True)
        yield from ((where, _document(obj, where), False) for where, obj in rows)


_worker: dict = {}


def _start_worker(directory: str, cfg: PrepareConfig) -> None:
    _worker.update(tok=Tokenizer.load(directory), cfg=cfg)


def _encode(batch: list[tuple[str, str, bool]]) -> list[tuple[str, np.ndarray, int]]:
    """(split, ids as bos + text + eos, UTF-8 bytes) of each document; FIM on train documents."""
    tok, cfg = _worker["tok"], _worker["cfg"]
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out = []
    for name, text, is_file in batch:
        digest = hashlib.sha1(name.encode()).hexdigest()
        split = "val" if int(digest, 16) % 1000 < cfg.val_per_mille else "train"
        ids = encode_document(text, tok, random.Random(digest), cfg.fim_rate if split == "train" else 0.0, cfg.fim_mode)
        if not cfg.allow_unknown_chars and tok.unk_id in ids:
            encode_checked(tok, text, name, is_file=is_file)  # raises, naming the file and line
        bos = [] if tok.bos_id is None else [tok.bos_id]
        out.append((split, np.array(bos + ids + [tok.eos_id], dtype=dtype), len(text.encode())))
    return out


def prepare(cfg: PrepareConfig, tok: Tokenizer | None = None, sentinels: bool = True) -> dict:
    """Tokenize the corpus into ``cfg.out`` with ``tok``, ``cfg.tokenizer`` or a new BPE (+ FIM ``sentinels``)."""
    cli_args.check_ranges(cfg)
    if not (cfg.data or cfg.corpus or cfg.dataset):
        raise ValueError("no data files given: pass files, folders or globs, --corpus python-stdlib or --dataset NAME")
    out = Path(cfg.out)
    if (out / "index.json").exists() and not cfg.overwrite:
        raise ValueError(f"{out} already holds shards; pass --overwrite to replace them, or choose another --out")
    skipped: dict[str, list[str]] = {"empty": [], "not_utf8": []}
    if tok is None and not cfg.tokenizer:
        texts = islice(documents(cfg, {"empty": [], "not_utf8": []}), cfg.limit)
        tok = Tokenizer.train_bpe((text for _, text, _ in texts), cfg.vocab_size)
    tok = Tokenizer.load(cfg.tokenizer) if tok is None else tok
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    tok.save(out)
    tok = Tokenizer.load(out)  # a copy: the caller's tokenizer keeps its vocabulary
    tok.tok.add_special_tokens([s for s in SENTINELS if sentinels and tok.tok.token_to_id(s) is None])
    tok.save(out)
    stats = {s: Counter(documents=0, tokens=0, bytes=0) for s in SPLITS}
    files = {s: (out / f".{s}.bin.tmp").open("wb") for s in SPLITS}
    docs = islice(documents(cfg, skipped), cfg.limit)
    batches = iter(lambda: list(islice(docs, 64)), [])  # lists of 64 documents until none are left
    workers = cfg.workers or os.cpu_count() or 1
    _start_worker(str(out), cfg)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process (and no warning at fork)
    pool = multiprocessing.Pool(workers, _start_worker, (str(out), cfg)) if workers > 1 else None
    for encoded in tqdm(pool.imap(_encode, batches) if pool else map(_encode, batches), "tokenizing", unit="batch",
                        disable=None):  # a bar on a terminal only
        for split, ids, n_bytes in encoded:
            files[split].write(ids.tobytes())
            stats[split].update(documents=1, tokens=len(ids), bytes=n_bytes)
    if pool:
        pool.close()
    for f in files.values():
        f.close()
    for kind, names in skipped.items():
        if names:
            print(f"note: skipped {len(names)} {kind.replace('_', '-')} file(s), e.g. {names[0]}", file=sys.stderr)
    if not stats["train"]["documents"] + stats["val"]["documents"]:
        first = skipped["empty"][0] if skipped["empty"] else "the source"
        raise ValueError(f"no text to prepare: {first} is empty, and so is every other document")
    for split, fix in (("train", "lower"), ("val", "raise")):
        if not stats[split]["documents"] and (split == "train" or cfg.val_per_mille):
            raise ValueError(f"the {split} split has no documents: {fix} --val-per-mille ({cfg.val_per_mille}) of "
                             "`nanoseek prepare`, or add documents")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    index = {"splits": stats, "dtype": dtype, "vocab_size": tok.vocab_size, "tokenizer_sha1": tokenizer_hash(tok),
             "source": {k: v for k, v in asdict(cfg).items() if k in ("data", "corpus", "dataset", "limit")},
             "python": sys.version if cfg.corpus == "python-stdlib" else None, "val_per_mille": cfg.val_per_mille,
             "fim": {"rate": cfg.fim_rate, "mode": cfg.fim_mode}, "skipped": skipped}
    for split in SPLITS:
        os.replace(out / f".{split}.bin.tmp", out / f"{split}.bin")
    atomic_write(out / "index.json", json.dumps(index, indent=2) + "\n")
    return index


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    index = prepare(cli_args.from_args(PrepareConfig, args))
    for split, s in index["splits"].items():
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    return 0
