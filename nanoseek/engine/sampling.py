"""Sampling: per-request parameters and the one sampler (``generate()``, RL rollouts, the server). Rows sharing
parameters and generator draw in one call; a seeded request only from its own (its text is batch-independent)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (OpenAI's request fields, in nanoseek's names)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None  # a private generator: the same text whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()  # the stop token ends the output and is included in the token ids
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one

    def __post_init__(self):
        checks = ((isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens must be an integer >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k is None or self.top_k >= 1, "top_k must be >= 1 (or None for no cut)"),
                  (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"))
        if problems := [message for ok, message in checks if not ok]:
            raise ValueError(f"{'; '.join(problems)} (got {self})")


def log_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
              top_p: float = 1.0) -> torch.Tensor:
    """logits: (..., V) -> log-probs (..., V) a row samples from: logits / ``temperature``, cut to the top ``top_k``,
    then to the smallest set reaching ``top_p`` (nucleus; the top token stays), renormalized. Temperature 0: softmax."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.log_softmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.log_softmax(-1)


def _groups(params: Sequence[SamplingParams], device: torch.device,
            generators: Sequence[torch.Generator | None] | None = None):
    """(rows, params, generator) per group sharing parameters; with ``generators``: sampled rows, by generator too."""
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(params):
        g = None if generators is None else id(generators[b])
        key = (0.0, None, 1.0, None) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p, g)
        groups.setdefault(key, []).append(b)
    for rows in groups.values():
        if generators is None or params[rows[0]].temperature > 0:
            yield torch.tensor(rows, device=device), params[rows[0]], generators and generators[rows[0]]


def log_probs_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: (B, ..., V) -> ``log_probs`` of row b under ``params[b]``."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for idx, p, _ in _groups(params, logits.device):
        out[idx] = log_probs(logits[idx], p.temperature, p.top_k, p.top_p)
    return out


def draw_rows(probs: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              greedy: torch.Tensor | None = None) -> torch.Tensor:
    """probs: (B, V) -> (B,) tokens drawn with each row's generator; greedy rows take ``greedy`` (default: argmax)."""
    out = probs.argmax(-1) if greedy is None else greedy
    for idx, _, generator in _groups(params, probs.device, generators):
        out[idx] = torch.multinomial(probs[idx], 1, generator=generator)[:, 0]
    return out


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
                ) -> tuple[list[int], list[float]]:
    """logits: (B, V) -> (tokens, log-probs under the distribution sampled) as lists, row b by ``params[b]``."""
    logp = log_probs_rows(logits, params)
    tokens = draw_rows(logp.exp(), params, generators, greedy=logits.float().argmax(-1))
    return tokens.tolist(), logp.gather(-1, tokens[:, None])[:, 0].tolist()


def uniform_rows(params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None], n: int,
                 device: torch.device) -> torch.Tensor:
    """(B, n) uniform draws in [0, 1), each sampled row's from its generator; zeros for greedy rows."""
    out = torch.zeros(len(params), n, device=device)
    for idx, _, generator in _groups(params, device, generators):
        out[idx] = torch.rand(len(idx), n, generator=generator, device=device)
    return out
