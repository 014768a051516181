"""One request's state as it moves through the engine: waiting -> prefilling -> decoding -> finished."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoseek.engine.detokenize import Detokenizer
from nanoseek.engine.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """A prompt, how to sample it, and what has been generated so far.

    The engine thread writes; other threads read ``output_ids``/``text`` only after ``on_output`` has told them,
    and may set ``cancelled`` at any time (the engine frees the request's cache space at its next step).
    ``on_output(request, text_delta)`` is called after every new token and once more when the request finishes.
    """

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    detokenizer: Detokenizer | None = None  # None: token ids only (no text, no stop strings)
    on_output: Callable[[Request, str], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each output token, under the distribution sampled
    text: str = ""  # the released output text (stop strings cut off)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False
    # engine bookkeeping
    row: int = -1  # cache row while prefilling or decoding
    prefilled: int = 0  # prompt tokens already in the cache
    followers: list[Request] = field(default_factory=list)  # same prompt, admitted together: prefilled once
    held: str = ""  # decoded text kept back because it may be the start of a stop string
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float) -> str:
        """Record one sampled token; finish on a stop token, a stop string, or the token budget. -> new text."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        new = ""
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"  # the stop token is kept in the ids, never in the text
        elif self.detokenizer is not None:
            new = self._release(self.detokenizer.add(token))
        if not self.finished and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finished:
            new += self.finish(self.finish_reason)
        return new

    def finish(self, reason: str) -> str:
        """End the request (also early: ``cancelled``, or ``length`` when the budget is 0). -> the text held back."""
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
        if self.detokenizer is None:
            return ""
        stopped = self.finish_reason == "stop" and self.output_ids[-1] not in self.params.stop_token_ids
        tail = "" if stopped else self.held + self.detokenizer.flush()
        for s in self.params.stop:  # a stop string completed by the flushed tail
            if s in tail:
                tail = tail[: tail.index(s)]
                self.finish_reason = "stop"
        self.held = ""
        self.text += tail
        return tail

    def _release(self, delta: str) -> str:
        """Add decoded text; cut at the first stop string (finishing), else hold back a possible stop prefix."""
        held = self.held + delta
        hits = [(held.index(s), s) for s in self.params.stop if s in held]
        if hits:
            out = held[: min(hits)[0]]
            self.held = ""
            self.finish_reason = "stop"
        else:
            keep = max((k for s in self.params.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            out, self.held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += out
        return out
