"""Batched generation over the latent KV cache, optionally with MTP speculative decoding (DeepSeek-V3 §5.4.3), on
one continuous-batching engine (``nanoseek.engine``, the project's one sampler). Outputs hold the new tokens only,
a stop token that ended a row included as its last token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek import cli_args
from nanoseek.cli_args import option
from nanoseek.engine import Engine, Request, SamplingParams
from nanoseek.fim import infill_prompt
from nanoseek.model.transformer import Transformer


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             return_logprobs: bool = False, **kwargs) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """The new tokens per prompt (and with ``return_logprobs`` their log-probs under the distribution each was
    sampled from, see ``sample_rows``); ``kwargs``: ``run_engine``'s (stops by default: the config's EOS)."""
    kwargs.setdefault("stop_token_ids", [t for t in [model.config.eos_token_id] if t is not None])
    requests, _ = run_engine(model, prompts, max_new_tokens, **kwargs)
    out = [r.output_ids for r in requests]
    return (out, [r.logprobs for r in requests]) if return_logprobs else out


@torch.inference_mode()
def run_engine(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
               seed: int | None = None, speculative: bool = False) -> tuple[list[Request], Engine | None]:
    """Continue every prompt (token ids) by up to ``max_new_tokens`` tokens, ending after a ``stop_token_ids`` token ->
    (the finished requests, the engine; None for no work). ``seed``: a private generator (global RNG untouched).
    ``speculative`` drafts with the MTP modules (same greedy output, same sampling distribution)."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=tuple(stop_token_ids))
    if not prompts:
        return [], None
    generator = None if seed is None else torch.Generator(model.embed_tokens.weight.device).manual_seed(seed)
    engine = Engine(model, num_slots=len(prompts), max_len=max(map(len, prompts)) + max_new_tokens,
                    speculative=speculative)
    requests = []
    for i, p in enumerate(prompts):
        try:
            requests.append(engine.add(p, params, generator=generator))
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    was_training = model.training
    try:
        model.eval()
        engine.run()
    finally:
        model.train(was_training)
    return requests, engine


# ---------------------------------------------------------------------- `nanoseek generate`
@dataclass
class GenerateConfig:
    model: str = option(help="Hugging Face format model directory, or a run directory")
    prompt: list[str] = option(default_factory=list, action="append", nargs=None,
                               help="text, or with --ids space-separated token ids; repeat for a batch")
    prefix_file: str | None = option(None, "infill (FIM-trained models): the text before the hole, not --prompt")
    suffix_file: str | None = option(None, "infill: the text after the hole")
    fim_mode: str = option("psm", "infill prompt order", choices=("psm", "spm"))
    ids: bool = option(False, "prompts are token ids, output is printed as ids")
    max_completion_length: int | None = option(None, "new tokens per prompt (default: all the context leaves)", min=0)
    temperature: float = option(0.0, "0 = greedy", min=0)
    top_k: int | None = option(None, "sample from the k most likely tokens only", min=1)
    top_p: float = option(1.0, "nucleus: the smallest set of tokens reaching this probability", gt=0, max=1)
    seed: int | None = option(None, "seed of the sampler")
    speculative: bool = option(False, "draft with the MTP modules and verify in the next forward")
    allow_unknown_chars: bool = option(False, "let characters the tokenizer lacks become <unk> (else an error)")
    device: str | None = option(None, "cpu, cuda or cuda:N (None: cuda when available)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of
    from nanoseek.tokenizer import Tokenizer, encode_checked

    cfg = cli_args.from_args(GenerateConfig, args)
    cli_args.check_ranges(cfg)
    directory = resolve_model_dir(cfg.model)
    model = Transformer.from_pretrained(directory).to(device_of(cfg.device))
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").exists() else None
    context, n = model.config.max_position_embeddings, cfg.max_completion_length
    if cfg.prefix_file or cfg.suffix_file:
        if cfg.prompt or cfg.ids or tokenizer is None or not (cfg.prefix_file and cfg.suffix_file):
            raise ValueError("infilling takes --prefix-file and --suffix-file (no --prompt or --ids) and a model "
                             "with a tokenizer")
        prompts = [infill_prompt(Path(cfg.prefix_file).read_text(), Path(cfg.suffix_file).read_text(), tokenizer,
                                 cfg.fim_mode, context - (min(64, context // 2) if n is None else n))]
    elif not cfg.prompt:
        raise ValueError("give --prompt (or --prefix-file and --suffix-file to infill)")
    elif cfg.ids:
        try:
            prompts = [[int(t) for t in p.split()] for p in cfg.prompt]
        except ValueError as e:
            raise ValueError(f"--prompt with --ids takes space-separated integers: {e}") from None
    elif tokenizer is None:
        raise ValueError(f"--model {directory} has no tokenizer.json: pass token ids with --ids")
    else:
        prompts = [encode_checked(tokenizer, p, f"--prompt {i + 1}", add_bos=True,
                                  allow_unknown=cfg.allow_unknown_chars) for i, p in enumerate(cfg.prompt)]
    room, i = min((context - len(p), i) for i, p in enumerate(prompts))  # the longest prompt leaves the least room
    if room < max(n or 0, 1):
        fix = "shorten the prompt" if n is None else f"lower --max-completion-length {n} or shorten the prompt"
        raise ValueError(f"--prompt {i + 1}: {context - room} tokens leave room for {max(room, 0)} new tokens in the "
                         f"model's context of {context}; {fix}")
    eos = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    requests, engine = run_engine(model, prompts, room if n is None else n, cfg.temperature, cfg.top_k, cfg.top_p,
                                  () if eos is None else (eos,), cfg.seed, cfg.speculative)
    for i, r in enumerate(requests):
        if len(requests) > 1:
            print(f"--- {i + 1}")
        print(" ".join(map(str, r.output_ids)) if cfg.ids else tokenizer.decode(r.output_ids))
    if engine is not None and engine.depth:
        rates = ", ".join(f"depth {d + 1} {a / max(p, 1):.1%}"
                          for d, (a, p) in enumerate(zip(engine.spec_accepted, engine.spec_proposed)))
        print(f"# MTP draft acceptance: {rates}", file=sys.stderr)
    return 0
