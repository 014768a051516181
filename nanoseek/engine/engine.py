"""The continuous-batching engine over the latent KV cache.

Memory: one preallocated ``KVCache`` of ``num_slots`` rows x ``max_len`` tokens; a slot holds one sequence (MLA:
c_KV and k_R per token and layer; MHA: K and V), so a cache budget in bytes fixes how many sequences run at once
(``slots_for_budget``). Rows are kept compact so every forward runs on a contiguous view of the cache, never a
gathered copy: decoding sequences occupy rows ``[0, D)``, prefilling ones the last rows ``[S - P, S)``; a
sequence that leaves a region is replaced by that region's edge row (one row copy).

Each ``step()``:
1. retire cancelled requests (their rows are free at once);
2. admit waiting requests while slots are free; requests with the same prompt admitted together share one
   prefill (the leader's cache row is copied to its followers: a GRPO group's G completions, or ``n`` > 1);
3. prefill: one right-padded forward over the oldest prefilling rows, at most ``prefill_tokens`` prompt tokens in
   all (a long prompt is chunked over several steps, so running sequences are not stalled); sequences whose
   prompt is complete sample their first token and join the decoding rows;
4. decode: one batched forward of one token for every decoding row (absorbed MLA: the latent is read once for
   all heads), sample per request, and retire finished sequences at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from nanoseek.cache import cache_widths
from nanoseek.engine.detokenize import Detokenizer
from nanoseek.engine.request import Request
from nanoseek.engine.sampling import SamplingParams, sample_rows
from nanoseek.model.transformer import Transformer


def bytes_per_token(model: Transformer, dtype: torch.dtype | None = None) -> int:
    """Cache bytes one token takes over all layers: MLA (d_c + d_R)·L, MHA 2·n_kv·d_h·L elements."""
    dtype = dtype or model.embed_tokens.weight.dtype
    return sum(cache_widths(model.config).values()) * model.config.num_hidden_layers * dtype.itemsize


def slots_for_budget(model: Transformer, cache_bytes: int, max_len: int) -> int:
    """How many sequences of up to ``max_len`` tokens fit in ``cache_bytes``."""
    return cache_bytes // (bytes_per_token(model) * max_len)


class Engine:
    """Continuous batching for ``model``: ``add`` requests (any thread), call ``step`` until ``has_work`` is False.

    Args:
        num_slots: sequences held at once (cache rows).
        max_len: tokens per sequence, prompt + output.
        prefill_tokens: prompt tokens prefilled per step (None: every admitted prompt in one forward).
        decode: token ids -> text, for requests that want text (streaming, stop strings).
    """

    def __init__(
        self,
        model: Transformer,
        num_slots: int,
        max_len: int,
        prefill_tokens: int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
    ):
        if num_slots < 1:
            raise ValueError(f"the cache holds no sequence: need num_slots >= 1, got {num_slots} "
                             "(raise the cache memory or lower the maximum sequence length)")
        self.model = model
        self.num_slots, self.max_len = num_slots, max_len
        self.prefill_tokens = prefill_tokens
        self.decode = decode
        self.cache = model.new_cache(num_slots, max_len)
        self.device = model.embed_tokens.weight.device
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # prefilling[i] sits at row num_slots - len(prefilling) + i
        self.decoding: list[Request] = []  # decoding[i] sits at row i
        self.lock = threading.Lock()
        self.generated_tokens = 0  # totals, for metrics and benchmarks
        self.prompt_tokens = 0
        self.decode_tokens = 0  # tokens from decode steps (the rest come from prefills)
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    # ------------------------------------------------------------------ requests
    def add(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        want_text: bool = False,
        on_output: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a request. ``generator`` is shared by the requests given the same one (``generate()``'s batch
        seed); otherwise a ``params.seed`` gets a private one. Raises ValueError naming what is wrong."""
        prompt = list(prompt)
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. a BOS token)")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"the prompt has token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"maximum sequence length of {self.max_len} tokens: shorten the prompt or max_tokens")
        if (want_text or params.stop) and self.decode is None:
            raise ValueError("text output and stop strings need a tokenizer")
        if generator is None and params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(prompt, params, generator, Detokenizer(self.decode) if want_text else None, on_output)
        with self.lock:
            self.waiting.append(request)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def slots_used(self) -> int:
        return len(self.decoding) + sum(1 + len(r.followers) for r in self.prefilling)

    @property
    def tokens_cached(self) -> int:
        return int(self.cache.lengths[: len(self.decoding)].sum()) + sum(r.prefilled for r in self.prefilling)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> None:
        self._retire_cancelled()
        self._admit()
        if self.prefilling:
            t = time.perf_counter()
            self._prefill()
            self.prefill_seconds += time.perf_counter() - t
        if self.decoding:
            t = time.perf_counter()
            self.decode_tokens += len(self.decoding)
            self._decode()
            self.decode_seconds += time.perf_counter() - t

    def _emit(self, request: Request, text: str) -> None:
        if request.on_output is not None:
            request.on_output(request, text)

    def _retire_cancelled(self) -> None:
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._emit(r, r.finish("cancelled"))
        for r in [r for r in self.decoding if r.cancelled]:
            self._leave_decoding(r)
            self._emit(r, r.finish("cancelled"))
        for leader in list(self.prefilling):
            for f in [f for f in leader.followers if f.cancelled]:
                leader.followers.remove(f)
                self._emit(f, f.finish("cancelled"))
            if leader.cancelled:
                self._leave_prefilling(leader)
                self._emit(leader, leader.finish("cancelled"))
                if leader.followers:  # the first follower takes over the prefill
                    heir, heir.followers = leader.followers[0], leader.followers[1:]
                    self._enter_prefilling(heir)

    def _admit(self) -> None:
        leaders: dict[tuple[int, ...], Request] = {}
        while self.waiting and self.slots_used < self.num_slots:
            with self.lock:
                request = self.waiting.popleft()
            if request.params.max_tokens == 0:
                self._emit(request, request.finish("length"))
                continue
            self.prompt_tokens += len(request.prompt)
            leader = leaders.get(tuple(request.prompt))
            if leader is not None:
                leader.followers.append(request)
            else:
                leaders[tuple(request.prompt)] = request
                self._enter_prefilling(request)

    def _prefill(self) -> None:
        """One right-padded forward over the oldest prefilling rows (a contiguous run at the end of the cache)."""
        budget = self.prefill_tokens or sum(len(r.prompt) for r in self.prefilling)
        chunks: list[int] = []  # chunks[j]: tokens of prefilling[-1 - j] in this forward
        cached = 0  # the longest cached prefix in the group (the padded forward writes up to cached + T)
        for r in reversed(self.prefilling):
            n = min(len(r.prompt) - r.prefilled, budget)
            if n == 0 or max(cached, r.prefilled) + max(chunks + [n]) > self.max_len:
                break
            chunks.append(n)
            cached = max(cached, r.prefilled)
            budget -= n
        group = self.prefilling[len(self.prefilling) - len(chunks) :]
        chunks.reverse()
        ids = torch.zeros(len(group), max(chunks), dtype=torch.long)
        for j, (r, n) in enumerate(zip(group, chunks)):
            ids[j, :n] = torch.tensor(r.prompt[r.prefilled : r.prefilled + n])
        n_t = torch.tensor(chunks, device=self.device)
        view = self.cache.view(group[0].row, group[-1].row + 1)
        h = self.model(ids.to(self.device), view, input_lengths=n_t, return_hidden=True)  # (k, T, D)
        done = []
        for j, (r, n) in enumerate(zip(group, chunks)):
            r.prefilled += n
            if r.prefilled == len(r.prompt):
                done.append((j, r))
        if not done:
            return
        last = h[[j for j, _ in done], [chunks[j] - 1 for j, _ in done]]  # (d, D)
        logits = self.model.lm_head(last)
        rows = [r for _, r in done for r in [r, *r.followers]]
        logits = logits.repeat_interleave(torch.tensor([1 + len(r.followers) for _, r in done],
                                                       device=self.device), dim=0)
        tokens, logps = sample_rows(logits, [r.params for r in rows], [r.generator for r in rows])
        for _, leader in done:
            self._leave_prefilling(leader)
            self._enter_decoding(leader, leader.row)
            for f in leader.followers:
                self._enter_decoding(f, leader.row)
            leader.followers = []
        self._record(rows, tokens, logps)

    def _decode(self) -> None:
        """One token for every decoding row, in one batched forward (absorbed MLA reads the latent once)."""
        tokens = torch.tensor([r.output_ids[-1] for r in self.decoding], device=self.device)
        view = self.cache.view(0, len(self.decoding))
        logits = self.model(tokens[:, None], view)[:, -1]  # (D, V)
        rows = list(self.decoding)
        new, logps = sample_rows(logits, [r.params for r in rows], [r.generator for r in rows])
        self._record(rows, new, logps)

    def _record(self, rows: list[Request], tokens: list[int], logps: list[float]) -> None:
        """Append each row's new token, tell its listener, and retire the rows that finished."""
        self.generated_tokens += len(rows)
        for r, t, lp in zip(rows, tokens, logps):
            text = r.append(t, lp)
            if r.finished:
                self._leave_decoding(r)
            self._emit(r, text)

    # ------------------------------------------------------------------ rows
    def _enter_prefilling(self, request: Request) -> None:
        request.row = self.num_slots - len(self.prefilling) - 1
        request.prefilled = 0
        self.cache.lengths[request.row] = 0
        self.prefilling.insert(0, request)

    def _leave_prefilling(self, request: Request) -> None:
        """Take ``request`` out of the prefilling rows: it swaps places with the first one, whose row then leaves
        the region (``request``'s cache is still there, for ``_enter_decoding`` to copy)."""
        edge = self.prefilling[0]
        if edge is not request:
            self.cache.swap_rows(edge.row, request.row)
            self.prefilling[self.prefilling.index(request)] = edge
            edge.row, request.row = request.row, edge.row
        self.prefilling.pop(0)

    def _enter_decoding(self, request: Request, src_row: int) -> None:
        """Put ``request`` at the next decoding row, its cache copied from ``src_row``."""
        row = len(self.decoding)
        if src_row != row:
            self.cache.copy_row(src_row, row)
        request.row = row
        self.decoding.append(request)

    def _leave_decoding(self, request: Request) -> None:
        """Free ``request``'s row: the last decoding row moves into it."""
        edge = self.decoding[-1]
        if edge is not request:
            self.cache.copy_row(edge.row, request.row)
            self.decoding[request.row] = edge
            edge.row = request.row
        self.decoding.pop()
