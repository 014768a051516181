"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character and lose none.

A byte-level BPE token can hold part of a multi-byte character, and decoding a lone suffix of the ids can differ
from the same ids decoded in context (leading-space and merge rules). So each step decodes a short window of ids
twice, ``ids[prefix:read]`` (text already emitted) and ``ids[prefix:]``, emits the difference, and waits while the
window's text ends in U+FFFD (an incomplete character). The scheme of Hugging Face TGI and vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """``add(token_id) -> new text`` for one sequence; ``flush()`` at the end returns whatever is still held."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few ids of context before the unread ones
        self.read = 0  # ids[:read] are already emitted as text
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back at the end (an incomplete character stays as U+FFFD, as a full decode gives it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self.decode(self.ids[self.prefix : self.read])
        window = self.decode(self.ids[self.prefix :])
        if len(window) <= len(done) or (window.endswith(REPLACEMENT) and not final):
            return ""
        delta = window[len(done) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
