"""Loader vs training throughput on the same shards, tokens/s: memory-mapped batches (``nanoseek.data.ShardData``)
against forward + backward + AdamW steps of a small model on those batches, same threads, interleaved round by
round (median). The loader must deliver at least 20x what training consumes.

    python benchmarks/loader.py                          # prepares a python-stdlib subset in a temporary folder
    python benchmarks/loader.py --data-dir SHARDS --preset small
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare
from nanoseek.data import ShardData
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.pretrain import TrainConfig, micro_loss
from nanoseek.train.schedule import OptimConfig, adamw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="shards made by `nanoseek prepare` (default: a python-stdlib subset)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps (and 100x that many loader batches) "
                        "per round")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    directory = args.data_dir or tmp.name
    if not args.data_dir:
        prepare(PrepareConfig(corpus="python-stdlib", limit=200, vocab_size=2048, out=directory, overwrite=True))
    tok = Tokenizer.load(directory)
    data = ShardData(directory, tok, args.seq_len, seed=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset).replace(vocab_size=tok.vocab_size)).train()
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    optimizer = adamw(model, OptimConfig())
    tokens = args.batch_size * args.seq_len
    load_rates, train_rates, step = [], [], 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(100 * args.steps):
            data.batch(step, args.batch_size)
            step += 1
        load_rates.append(100 * args.steps * tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(args.steps):
            batch = data.batch(step + i, args.batch_size)
            n_tokens = [batch.targets.numel()] * (len(model.mtp) + 1)
            optimizer.zero_grad(set_to_none=True)
            micro_loss(model, model, batch, cfg, n_tokens, 1.0, len(model.mtp) > 0)[0].backward()
            optimizer.step()
        train_rates.append(args.steps * tokens / (time.perf_counter() - t0))
    load, train = statistics.median(load_rates), statistics.median(train_rates)
    print(f"shards {directory}: {data.n:,} chunks of {args.seq_len + 1} tokens; preset {args.preset}, batch "
          f"{args.batch_size} x {args.seq_len}, {torch.get_num_threads()} thread(s)")
    print(f"loader   {load:>14,.0f} tokens/s")
    print(f"training {train:>14,.0f} tokens/s")
    print(f"ratio    {load / train:>14,.0f}x  ({'ok' if load >= 20 * train else 'FAIL'}: at least 20x)")


if __name__ == "__main__":
    main()
