"""One request's state as it moves through the engine (waiting -> prefilling -> decoding -> finished), and the
incremental detokenization that streams its text (the scheme of Hugging Face TGI and vLLM): a byte-level BPE token
can hold part of a character, and a lone suffix of the ids can decode differently from the same ids in context, so
each step decodes a short window twice, ``ids[prefix:read]`` (already emitted) and ``ids[prefix:]``, emits the
difference, and waits while the window ends in U+FFFD (an incomplete character)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.engine.sampling import SamplingParams


class Detokenizer:
    """``add(token_id) -> new text`` for one sequence; ``flush()`` at the end returns whatever is still held."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # window start (a few ids of context before the unread ones); ids[:read]: emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self.flush(final=False)

    def flush(self, final: bool = True) -> str:
        """The new text; ``final`` (at the end) also releases a held incomplete character as U+FFFD (as decode does)."""
        done, window = self.decode(self.ids[self.prefix : self.read]), self.decode(self.ids[self.prefix :])
        if len(window) <= len(done) or (window.endswith("\ufffd") and not final):
            return ""
        delta = window[len(done) :]
        self.prefix, self.read = self.read, len(self.ids)
        return delta


@dataclass(eq=False)
class Request:
    """A prompt, how to sample it, and what has been generated so far. The engine thread writes and calls
    ``on_output(request, text_delta)`` after every new token and at the finish; other threads read after that
    call, and may set ``cancelled`` at any time (the engine frees the request's cache space at its next step)."""

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
    row: int = -1  # engine bookkeeping from here: the cache row while prefilling or decoding
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
        cut = reason == "stop" and self.output_ids[-1] not in self.params.stop_token_ids  # at a stop string
        self.finish_reason, self.finish_time = reason, time.perf_counter()
        if self.detokenizer is None or cut:
            return ""
        tail = self._release(self.detokenizer.flush()) + self.held  # a stop string may complete in the tail
        self.text, self.held = self.text + self.held, ""
        return tail

    def _release(self, delta: str) -> str:
        """Add decoded text; cut at the first stop string (finishing), else hold back a possible stop prefix."""
        held = self.held + delta
        hits = [(held.index(s), s) for s in self.params.stop if s in held]
        if hits:
            out, self.held, self.finish_reason = held[: min(hits)[0]], "", "stop"
        else:
            keep = max((k for s in self.params.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            out, self.held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += out
        return out
