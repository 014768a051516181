"""``nanoseek tokenizer train --files a.txt b.txt --vocab-size N --out DIR``: a byte-level BPE trained with
Hugging Face ``tokenizers`` on local text, saved as DIR/tokenizer.json (+ tokenizer_config.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from nanoseek import cli_args
from nanoseek.cli_args import option
from nanoseek.tokenizer import Tokenizer


@dataclass(frozen=True)
class TrainTokenizerConfig:
    files: list[str] = option(help="plain text files", nargs="+")
    out: str = option(help="directory for tokenizer.json")
    vocab_size: int = option(4096, "tokens in the vocabulary (at least 256 bytes + 4 specials)")
    min_frequency: int = option(2, "fewest occurrences of a pair to merge it", min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    cli_args.add_arguments(sub.add_parser("train", help="train a byte-level BPE on local text files"),
                           TrainTokenizerConfig)


def run(args: argparse.Namespace) -> int:
    cfg = cli_args.from_args(TrainTokenizerConfig, args)
    if cfg.vocab_size < 260:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is too small: byte-level BPE needs 256 bytes + 4 specials")
    cli_args.check_ranges(cfg)
    tok = Tokenizer.train_bpe(cfg.files, cfg.vocab_size, cfg.min_frequency)
    tok.save(cfg.out)
    print(f"{cfg.out}/tokenizer.json: {tok.vocab_size} tokens")
    return 0
