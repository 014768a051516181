"""``nanoseek tokenizer train --files a.txt b.txt --vocab-size N --out DIR``: a byte-level BPE trained with
Hugging Face ``tokenizers`` on local text, saved as DIR/tokenizer.json (+ tokenizer_config.json)."""

from __future__ import annotations

import argparse

from nanoseek.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on local text files")
    t.add_argument("--files", nargs="+", required=True, help="plain text files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="directory for tokenizer.json")


def run(args: argparse.Namespace) -> int:
    if args.vocab_size < 260:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small: byte-level BPE needs 256 bytes + 4 specials")
    tok = Tokenizer.train_bpe(args.files, args.vocab_size, args.min_frequency)
    tok.save(args.out)
    print(f"{args.out}/tokenizer.json: {tok.vocab_size} tokens")
    return 0
