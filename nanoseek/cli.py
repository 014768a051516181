"""``nanoseek`` command line. Each subcommand lives in the module that does the work; that module defines
``add_arguments(parser)`` and ``run(args) -> int`` (``args.command`` names the subcommand)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from dataclasses import dataclass

import torch

from nanoseek import cli_args
from nanoseek.cache import elements_per_token
from nanoseek.config import PRESETS, ModelConfig
from nanoseek.flops import flops_per_token, measure_peak_flops
from nanoseek.model.transformer import Transformer

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nanoseek.recipes.demo", "the whole recipe on a built-in task: SFT, GRPO, evaluation, plots, report"),
    "r1": ("nanoseek.recipes.r1", "R1's pipeline on GSM8K-style problems: SFT, GRPO, rejection sampling, distillation"),
    "ablate": ("nanoseek.recipes.ablate", "the recipe's claims measured: MoE, MLA, balancing, MTP, GRPO vs PPO"),
    "info": ("nanoseek.cli", "build a preset model; print parameters, active parameters and KV-cache sizes"),
    "prepare": ("nanoseek.corpus", "tokenize a corpus once into memory-mapped train/val shards for pretrain"),
    "pretrain": ("nanoseek.train.pretrain", "next-token (+MTP) pretraining on a built-in task or local text"),
    "sft": ("nanoseek.train.pretrain", "supervised fine-tuning on (prompt, completion) pairs"),
    "grpo": ("nanoseek.train.grpo", "GRPO reinforcement learning with verifiable rewards"),
    "ppo": ("nanoseek.train.ppo", "the PPO (critic) baseline, for comparison with GRPO"),
    "generate": ("nanoseek.generate", "sample from a checkpoint with the latent KV cache"),
    "sample": ("nanoseek.sample", "K completions per prompt, scored; keep the verified ones as an SFT dataset"),
    "serve": ("nanoseek.serve", "OpenAI-compatible server with continuous batching, and a chat page"),
    "eval": ("nanoseek.evaluate", "held-out accuracy, maj@k and pass@k of a checkpoint on a built-in task or dataset"),
    "plot": ("nanoseek.report", "PNG curves from a run directory's metrics.jsonl"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand -> 0 done, 2 a usage error (bad flags, inputs or config: one stderr line naming it), 1 a
    failure (traceback and one-line summary), 130 Ctrl-C (after saving). Only rank 0 of a torchrun job reports."""
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek recipe in compact PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    argv = sys.argv[1:] if argv is None else argv
    main_rank, name = os.environ.get("RANK", "0") == "0", "nanoseek"
    try:
        cli_args.check_renamed(argv)
        args = parser.parse_args(argv)  # bad flags: argparse prints usage to stderr and exits 2
        if args.command is None:
            parser.print_help()
            return 0
        name = f"nanoseek {args.command}"
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        status, message = 130, "interrupted"
    except (FileNotFoundError, ValueError) as err:  # bad input: the message names the file/field and the fix
        status, message = 2, f"{name}: error: {err}"
    except Exception as err:  # a bug or a failure of the system: the traceback says where
        if main_rank:
            traceback.print_exc()
        status, message = 1, f"{name}: failed: {type(err).__name__}: {err} (traceback above)"
    if main_rank:
        print(message, file=sys.stderr)
    return status


@dataclass
class InfoConfig:
    preset: str = cli_args.option("small", "the model shape", choices=tuple(PRESETS))
    seq_len: int = cli_args.option(16, "tokens in the forward pass (presets up to 1024 wide)", min=1)
    peak: bool = cli_args.option(False, "time a large matmul: the device's peak FLOP/s, the MFU denominator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser, InfoConfig)


def run(args: argparse.Namespace) -> int:
    cfg = cli_args.from_args(InfoConfig, args)
    cli_args.check_ranges(cfg)
    config = ModelConfig.preset(cfg.preset)
    huge = config.hidden_size > 1024
    with torch.device("meta" if huge else "cpu"):
        model = Transformer(config)
    mha = config.replace(attention_type="mha", head_dim=config.v_head_dim)  # the same heads, uncompressed
    mla_elems, mha_elems = elements_per_token(config), elements_per_token(mha)
    print(f"preset {cfg.preset}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}")
    n_mtp = model.num_parameters(include_mtp=True) - model.num_parameters()
    print(f"  parameters            {model.num_parameters():>16,}  (+{n_mtp:,} MTP)")
    print(f"  active per token      {model.num_active_parameters():>16,}")
    print(f"  KV cache elems/token  MLA {mla_elems:,}  vs  MHA {mha_elems:,} "
          f"({config.num_attention_heads} heads x {config.v_head_dim})  = {100 * mla_elems / mha_elems:.2f}%")
    if not huge:
        ids = torch.randint(0, config.vocab_size, (1, cfg.seq_len))
        with torch.no_grad():
            print(f"  forward pass          input {tuple(ids.shape)} -> logits {tuple(model.eval()(ids).shape)}")
    print(f"  train FLOPs/token     {flops_per_token(config, cfg.seq_len):>16,.0f}  (seq_len {cfg.seq_len})")
    if cfg.peak:
        device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
        print(f"  peak {device} {dtype}: {measure_peak_flops(device, dtype) / 1e9:,.1f} GFLOP/s (best timed matmul)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
