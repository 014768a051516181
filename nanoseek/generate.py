"""Batched generation over the latent KV cache, and MTP self-speculative decoding (DeepSeek-V3 §5.4.3).

``generate`` runs the batch on the continuous-batching engine (``nanoseek.engine``, the project's one sampler):
the distinct prompts are prefilled in one right-padded forward (a GRPO group's G copies of a prompt once, the
cache row then copied), then every live row decodes one token per step in one batched forward; rows that hit a
stop token or their budget leave the batch at once, so finished sequences stop costing compute. Outputs hold the
new tokens only; a stop token that ended a row is included as its last token.

``generate_speculative`` (greedy only) drafts one token with the first MTP module and verifies it with the
main model in the same forward that produces the next token: 1 or 2 tokens per main-model step, output
identical to plain greedy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.sampling import sample  # noqa: F401  (re-exported: ``from nanoseek.generate import sample``)
from nanoseek.model.transformer import Transformer


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. a BOS token)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def distinct_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """-> (first row of each distinct prompt (U,), each row's index into those (B,)): a GRPO group's G copies of
    a prompt collapse to one."""
    index: dict[tuple[int, ...], int] = {}
    first_rows, row_to_prompt = [], []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in index:
            index[key] = len(first_rows)
            first_rows.append(i)
        row_to_prompt.append(index[key])
    return first_rows, row_to_prompt


def _prefill(model: Transformer, prompts: Sequence[Sequence[int]], extra: int):
    """One right-padded forward over the distinct prompts, the cache then copied to every row that repeats one.
    Returns (cache, hidden (B, T, D), ids (B, T), lengths (B,))."""
    device = model.embed_tokens.weight.device
    first_rows, row_to_prompt = distinct_prompts(prompts)
    distinct = [prompts[i] for i in first_rows]
    lengths = torch.tensor([len(p) for p in distinct], device=device)
    ids = torch.zeros(len(distinct), int(lengths.max()), dtype=torch.long, device=device)
    for i, p in enumerate(distinct):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    cache = model.new_cache(len(distinct), ids.shape[1] + extra)
    h = model(ids, cache, input_lengths=lengths, return_hidden=True)
    if len(distinct) < len(prompts):
        rows = torch.tensor(row_to_prompt, device=device)
        cache.select(rows)
        h, ids, lengths = h[rows], ids[rows], lengths[rows]
    return cache, h, ids, lengths


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Put the model in eval mode for a call and restore the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    return_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Continue every prompt (token-id lists of any lengths) by up to ``max_new_tokens`` tokens.

    Returns the new tokens per prompt; a row ends early right after the first token in ``stop_token_ids``
    (which is included). ``seed`` makes sampling reproducible (a private generator; global RNG untouched);
    greedy (temperature 0) is deterministic. With ``return_logprobs`` also returns each new token's log-prob
    under the distribution it was sampled from (see ``sample``).
    """
    _check(prompts, max_new_tokens, model.config.vocab_size)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=tuple(stop_token_ids))
    if max_new_tokens == 0 or not prompts:
        out: list[list[int]] = [[] for _ in prompts]
        return (out, [[] for _ in prompts]) if return_logprobs else out
    device = model.embed_tokens.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    engine = Engine(model, num_slots=len(prompts), max_len=max(map(len, prompts)) + max_new_tokens)
    requests = [engine.add(p, params, generator=generator) for p in prompts]
    with _eval_mode(model):
        engine.run()
    out = [r.output_ids for r in requests]
    return (out, [r.logprobs for r in requests]) if return_logprobs else out


@torch.inference_mode()
def generate_speculative(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[list[int]], float]:
    """Greedy decoding with MTP self-speculation. Returns (new tokens as ``generate`` would, acceptance rate).

    Each step feeds the main model [t_n, d] where d is the MTP draft of t_{n+1}: its logits at t_n check d
    and, if d is right, its logits at d give t_{n+2} for free. The MTP module (own cache) then consumes the
    main states of the 1 or 2 new positions and drafts the next token. Rejected slots are reused (the
    cache length just does not advance over them).
    """
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP module: config.num_nextn_predict_layers >= 1")
    _check(prompts, max_new_tokens, model.config.vocab_size)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return out, 0.0
    device = model.embed_tokens.weight.device
    stop = set(stop_token_ids)
    accepted = proposed = 0
    with _eval_mode(model):
        cache, h, ids, lengths = _prefill(model, prompts, max_new_tokens + 1)
        B = len(prompts)
        ar = torch.arange(B, device=device)
        nxt = model.lm_head(h[ar, lengths - 1]).argmax(-1)  # t_n: (B,)
        # MTP prefill: position i pairs h_i with t_{i+1} (the last prompt position with the new token)
        shifted = ids.roll(-1, dims=1)
        shifted[ar, lengths - 1] = nxt
        mcache = model.new_cache(B, cache.max_len, mtp=True)
        draft = model.mtp_draft(h, shifted, mcache, input_lengths=lengths)[ar, lengths - 1].argmax(-1)
        rows = ar
        new = [[t] for t in nxt.tolist()]
        while True:
            live = []
            for i, (r, toks) in enumerate(zip(rows.tolist(), new)):
                room = max_new_tokens - len(out[r])
                toks = toks[:room]
                for j, t in enumerate(toks):
                    if t in stop:
                        toks = toks[: j + 1]
                        break
                out[r].extend(toks)
                if len(out[r]) < max_new_tokens and not (toks and toks[-1] in stop):
                    live.append(i)
            if not live:
                break
            if len(live) < len(rows):
                keep = torch.tensor(live, device=device)
                cache.select(keep)
                mcache.select(keep)
                rows, nxt, draft = rows[keep], nxt[keep], draft[keep]
            h = model(torch.stack((nxt, draft), dim=1), cache, return_hidden=True)  # (b, 2, D)
            pred = model.lm_head(h).argmax(-1)  # (b, 2): t_{n+1}, and t_{n+2} if the draft was right
            ok = pred[:, 0] == draft
            cache.lengths -= (~ok).long()  # a rejected draft's slot is overwritten next step
            accepted += int(ok.sum())
            proposed += len(ok)
            # MTP positions n, n+1 pair h_n with t_{n+1} and h_{n+1} with t_{n+2}
            m_logits = model.mtp_draft(h, pred, mcache, input_lengths=1 + ok.long())
            draft = m_logits[torch.arange(len(ok), device=device), ok.long()].argmax(-1)
            nxt = torch.where(ok, pred[:, 1], pred[:, 0])
            new = [[p0, p1] if a else [p0] for a, p0, p1 in zip(ok.tolist(), *pred.T.tolist())]
    return out, accepted / max(proposed, 1)


# ---------------------------------------------------------------------- `nanoseek generate`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Hugging Face format model directory, or a run directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text (through the checkpoint's tokenizer) or, with --ids, space-separated token ids; "
                             "repeat for a batch")
    parser.add_argument("--ids", action="store_true", help="prompts are token ids, output is printed as ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--decode-impl", choices=("absorb", "naive"), default="absorb", help="MLA decode path")
    parser.add_argument("--speculative", action="store_true", help="greedy MTP self-speculative decoding")
    parser.add_argument("--allow-unknown-chars", action="store_true",
                        help="let characters the tokenizer lacks become <unk> (default: an error listing them)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import resolve_model_dir

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    directory = resolve_model_dir(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(directory).to(device)
    if model.config.attention_type == "mla":
        model.set_decode_impl(args.decode_impl)
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from nanoseek.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(directory)
    if args.ids:
        try:
            prompts = [[int(t) for t in p.split()] for p in args.prompt]
        except ValueError as e:
            print(f"--prompt with --ids takes space-separated integers: {e}", file=sys.stderr)
            return 2
    elif tokenizer is None:
        print(f"--checkpoint {directory} has no tokenizer.json: pass token ids with --ids", file=sys.stderr)
        return 2
    else:
        from nanoseek.tokenizer import encode_checked

        prompts = [encode_checked(tokenizer, p, f"--prompt {i + 1}", add_bos=tokenizer.bos_id is not None,
                                  allow_unknown=args.allow_unknown_chars) for i, p in enumerate(args.prompt)]
    context = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) + args.max_new_tokens > context:
            raise ValueError(f"--prompt {i + 1}: {len(p)} tokens + --max-new-tokens {args.max_new_tokens} exceed the "
                             f"model's context of {context} (max_position_embeddings); shorten the prompt or lower "
                             "--max-new-tokens")
    eos = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    stop = () if eos is None else (eos,)
    try:
        if args.speculative:
            if args.temperature != 0:
                raise ValueError("--speculative is greedy only: drop --temperature")
            outs, rate = generate_speculative(model, prompts, args.max_new_tokens, stop_token_ids=stop)
            print(f"# MTP draft acceptance: {rate:.1%}", file=sys.stderr)
        else:
            outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop_token_ids=stop, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for out in outs:
        print(" ".join(map(str, out)) if args.ids or tokenizer is None else tokenizer.decode(out))
    return 0
