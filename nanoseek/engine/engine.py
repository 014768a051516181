"""The continuous-batching engine over the latent KV cache: one preallocated ``KVCache`` row per sequence (a cache
budget fixes how many run at once: ``slots_for_budget``). Decoding sequences take the first rows and prefilling ones the
last, so every forward runs on a contiguous view; one leaving a region is replaced by its edge row. Each ``step()``
retires cancelled requests, admits waiting ones (same prompts admitted together, e.g. a GRPO group, share one prefill),
prefills at most ``prefill_tokens`` prompt tokens (chunked, so decodes never stall), and decodes every decoding row in
one forward. Speculative decoding (DeepSeek-V3 §5.4.3): the MTP modules draft D tokens per row (``mtp.draft``, own
cache); the next decode verifies them (``verify``), keeps those accepted plus one, and sets both caches back."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from nanoseek.cache import KVCache, elements_per_token
from nanoseek.engine.request import Detokenizer, Request
from nanoseek.engine.sampling import SamplingParams, draw_rows, log_probs_rows, sample_rows, uniform_rows
from nanoseek.model.mtp import draft
from nanoseek.model.transformer import Transformer


def bytes_per_token(model: Transformer) -> int:
    """Cache bytes one token takes over all layers (``cache.elements_per_token`` in the model's dtype)."""
    return elements_per_token(model.config) * model.embed_tokens.weight.dtype.itemsize


def slots_for_budget(model: Transformer, cache_bytes: int, max_len: int, speculative: bool = False) -> int:
    """How many sequences of up to ``max_len`` tokens fit in ``cache_bytes`` (``speculative``: with the D draft
    positions, the D MTP blocks' cache and the drafts' distributions, fp32 over the vocabulary)."""
    D, L = (len(model.mtp) if speculative else 0), model.config.num_hidden_layers
    return cache_bytes // (bytes_per_token(model) * (max_len + D) * (L + D) // L + D * model.config.vocab_size * 4)


def verify(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's acceptance rule (Leviathan et al. 2023, Chen et al. 2023). p: (B, D+1, V) target
    distributions at the verified positions; q: (B, D, V) those the drafts x (B, D) were drawn from; u: (B, D) uniform
    draws in [0, 1). Draft j is accepted with probability min(1, p_j(x) / q_j(x)), up to the first rejection ->
    (accepted drafts per row (B,), the next token's distribution (B, V): norm(max(0, p_j - q_j)) at the rejected
    position, p_D after D acceptances). A one-hot p (greedy) accepts while the draft is its argmax."""
    px, qx = p[:, :-1].gather(-1, x[..., None])[..., 0], q.gather(-1, x[..., None])[..., 0]
    n = (u * qx < px).long().cumprod(1).sum(1)
    rows = torch.arange(len(n), device=n.device)
    residual = (p[rows, n] - torch.nn.functional.pad(q, (0, 0, 0, 1))[rows, n]).clamp(min=0)  # q_D = 0
    return n, residual / residual.sum(-1, keepdim=True)


class Engine:
    """Continuous batching for ``model``: ``add`` requests (any thread), call ``step`` until ``has_work`` is False.
    ``num_slots`` sequences (cache rows) of ``max_len`` tokens each, prompt + output; ``prefill_tokens`` prompt
    tokens prefilled per step (None: all); ``decode``: token ids -> text, for requests that want text. With
    ``speculative``, ``spec_proposed[d]`` / ``spec_accepted[d]`` count the drafts at depth d + 1 verified / accepted."""

    def __init__(self, model: Transformer, num_slots: int, max_len: int, prefill_tokens: int | None = None,
                 decode: Callable[[Sequence[int]], str] | None = None, speculative: bool = False):
        if num_slots < 1:
            raise ValueError(f"the cache holds no sequence: need num_slots >= 1, got {num_slots} "
                             "(raise the cache memory or lower the maximum sequence length)")
        self.model, self.num_slots, self.max_len = model, num_slots, max_len
        self.prefill_tokens, self.decode = prefill_tokens, decode
        self.depth = len(model.mtp) if speculative else 0
        if speculative and not self.depth:
            raise ValueError("speculative decoding needs MTP modules: config.num_nextn_predict_layers >= 1")
        self.device = model.embed_tokens.weight.device
        self.cache = model.new_cache(num_slots, max_len + self.depth)  # + room for the drafts being verified
        self.caches = [self.cache, *([model.new_cache(num_slots, self.cache.max_len, mtp=True)] if self.depth else [])]
        self.drafts = torch.zeros(num_slots, self.depth, dtype=torch.long, device=self.device)
        self.draft_probs = torch.zeros(num_slots, self.depth, model.config.vocab_size, device=self.device)
        self.spec_proposed, self.spec_accepted = [0] * self.depth, [0] * self.depth
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # prefilling[i] sits at row num_slots - len(prefilling) + i
        self.decoding: list[Request] = []  # decoding[i] sits at row i
        self.lock = threading.Lock()
        # totals, for metrics and benchmarks; decode_tokens: from decode steps (the rest come from prefills)
        self.generated_tokens, self.prompt_tokens, self.decode_tokens, self.decode_seconds = 0, 0, 0, 0.0

    def add(self, prompt: Sequence[int], params: SamplingParams, *, generator: torch.Generator | None = None,
            want_text: bool = False, on_output: Callable[[Request, str], None] | None = None) -> Request:
        """Queue a request; ``generator``: shared by the requests given it (batch seed), else ``params.seed``'s own."""
        prompt, vocab = list(prompt), self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. a BOS token)")
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise ValueError(f"the prompt has token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                             f"{len(prompt)} tokens and max_tokens is {params.max_tokens}: shorten one of them")
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

    def abort(self, reason: str) -> None:
        """Finish every request with ``reason`` and empty the engine (after a failed step, or at shutdown)."""
        with self.lock:
            requests = [*self.waiting, *self.decoding, *(q for r in self.prefilling for q in (r, *r.followers))]
            self.waiting, self.prefilling, self.decoding = deque(), [], []
        for r in [r for r in requests if not r.finished]:
            self._emit(r, r.finish(reason))

    def run(self) -> None:
        while self.has_work():
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        self._retire_cancelled()
        self._admit()
        if self.prefilling:
            self._prefill()
        if self.decoding:
            t = time.perf_counter()
            self.decode_tokens += self._decode()
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
            self._leave(self.decoding, r)
            self._emit(r, r.finish("cancelled"))
        for leader in list(self.prefilling):
            for f in [f for f in leader.followers if f.cancelled]:
                leader.followers.remove(f)
                self._emit(f, f.finish("cancelled"))
            if leader.cancelled:
                self._leave(self.prefilling, leader)
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
            if (leader := leaders.setdefault(tuple(request.prompt), request)) is request:
                self._enter_prefilling(request)
            else:
                leader.followers.append(request)

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
        T = max(chunks)
        ids = torch.zeros(len(group), T + self.depth + 1, dtype=torch.long)  # the MTP chain reads D + 1 further
        for j, r in enumerate(group):
            seg = r.prompt[r.prefilled : r.prefilled + ids.shape[1]]
            ids[j, : len(seg)] = torch.tensor(seg)
        ids, n_t = ids.to(self.device), torch.tensor(chunks, device=self.device)
        h = self.model(ids[:, :T], self.cache.view(group[0].row, group[-1].row + 1), input_lengths=n_t,
                       return_hidden=True)  # (k, T, D)
        if self.depth:  # the MTP cache follows the prompt; a token not known yet reads as 0 until redrafted below
            draft(self.model, h, ids, self.caches[1].view(group[0].row, group[-1].row + 1), n_t)
        for r, n in zip(group, chunks):
            r.prefilled += n
        done = [(j, r) for j, r in enumerate(group) if r.prefilled == len(r.prompt)]
        if not done:
            return
        last = h[[j for j, _ in done], [chunks[j] - 1 for j, _ in done]]  # (d, D)
        rows = [r for _, r in done for r in [r, *r.followers]]
        repeats = torch.tensor([1 + len(r.followers) for _, r in done], device=self.device)
        logits = self.model.lm_head(last).repeat_interleave(repeats, dim=0)  # (rows, V)
        tokens, logps = sample_rows(logits, [r.params for r in rows], [r.generator for r in rows])
        for _, leader in done:
            self._leave(self.prefilling, leader)
            for r in (leader, *leader.followers):  # the leader's cache row, then a copy of it per follower
                src, r.row = leader.row, len(self.decoding)
                if src != r.row:
                    self._copy_rows([src], [r.row])
                self.decoding.append(r)
            leader.followers = []
        if self.depth:  # redraft the last prompt position with the sampled token, per row
            ids = torch.zeros(len(rows), self.depth + 2, dtype=torch.long, device=self.device)
            ids[:, :2] = torch.tensor([[r.prompt[-1], t] for r, t in zip(rows, tokens)])  # prompt end, sampled token
            view = self.caches[1].view(rows[0].row, rows[-1].row + 1)
            view.lengths -= 1
            self._draft(rows, last.repeat_interleave(repeats, dim=0)[:, None], ids, view, torch.ones_like(ids[:, 0]))
        self._record(rows, [[t] for t in tokens], [[lp] for lp in logps])

    def _decode(self) -> int:
        """One forward of [last token, D drafts] per decoding row: verify, set back, redraft (D = 0: sample p_0)."""
        rows, D, B = list(self.decoding), self.depth, len(self.decoding)
        params, generators = [r.params for r in rows], [r.generator for r in rows]
        ids = torch.zeros(B, 2 * D + 2, dtype=torch.long, device=self.device)
        ids[:, 0] = torch.tensor([r.output_ids[-1] for r in rows])
        ids[:, 1 : D + 1] = self.drafts[:B]
        view = self.cache.view(0, B)
        h = self.model(ids[:, : D + 1], view, return_hidden=True)  # (B, D+1, hidden)
        logits = self.model.lm_head(h)
        if not D:  # plain decoding: sample the next token directly (verify's vocabulary-wide work is for drafts)
            tokens, lps = sample_rows(logits[:, 0], params, generators)
            return self._record(rows, [[t] for t in tokens], [[lp] for lp in lps])
        logp = log_probs_rows(logits, params)  # (B, D+1, V)
        p = logp.exp()
        greedy = torch.tensor([x.temperature == 0 for x in params], device=self.device)
        if greedy.any():  # greedy rows: p one-hot at the argmax (their draft is q's argmax)
            p[greedy] = torch.nn.functional.one_hot(logits[greedy].argmax(-1), p.shape[-1]).float()
        n, nxt = verify(p, self.draft_probs[:B], ids[:, 1 : D + 1], uniform_rows(params, generators, D, self.device))
        view.lengths -= D - n  # the rejected positions are overwritten by the next forward
        ids[torch.arange(B, device=self.device), n + 1] = draw_rows(nxt, params, generators)
        self._draft(rows, h, ids, self.caches[1].view(0, B), n + 1)
        self.spec_proposed = [x + B for x in self.spec_proposed]
        self.spec_accepted = [x + int((n > d).sum()) for d, x in enumerate(self.spec_accepted)]
        new = ids[:, 1 : D + 2]
        lps = logp.gather(-1, new[..., None])[..., 0]  # log p of each kept token: its distribution (see verify)
        counts = (n + 1).tolist()
        return self._record(rows, [t[:c] for t, c in zip(new.tolist(), counts)],
                            [lp[:c] for lp, c in zip(lps.tolist(), counts)])

    def _draft(self, rows: list[Request], h: torch.Tensor, ids: torch.Tensor, view: KVCache, counts: torch.Tensor
               ) -> None:
        """``mtp.draft`` for the contiguous decoding ``rows``, sampled as each row samples, kept for the next verify."""
        params, generators = [r.params for r in rows], [r.generator for r in rows]
        start, probs = rows[0].row, []

        def pick(logits: torch.Tensor) -> torch.Tensor:
            probs.append(log_probs_rows(logits, params).exp())
            return draw_rows(probs[-1], params, generators)

        draft(self.model, h, ids, view, counts, pick)
        offsets = torch.arange(1, self.depth + 1, device=self.device)
        self.drafts[start : start + len(rows)] = ids.gather(1, counts[:, None] + offsets)  # ids[b, counts[b] + k]
        self.draft_probs[start : start + len(rows)] = torch.stack(probs, 1)

    def _record(self, rows: list[Request], tokens: list[list[int]], logps: list[list[float]]) -> int:
        """Append each row's new tokens up to its end, tell its listener, retire finished rows. -> tokens appended."""
        appended = 0
        for r, ts, lps in zip(rows, tokens, logps):
            text = ""
            for t, lp in zip(ts, lps):
                if not r.finished:  # tokens after the end are dropped
                    text, appended = text + r.append(t, lp), appended + 1
            if r.finished:
                self._leave(self.decoding, r)
            self._emit(r, text)
        self.generated_tokens += appended
        return appended

    def _enter_prefilling(self, request: Request) -> None:
        request.row = self.num_slots - len(self.prefilling) - 1  # its prefilled is 0: a follower never prefills
        for cache in self.caches:
            cache.lengths[request.row] = 0
        self.prefilling.insert(0, request)

    def _leave(self, region: list[Request], request: Request) -> None:
        """Take ``request`` out of ``region``: the region's edge row (prefilling's first, decoding's last) moves into
        its row; a prefilling request is swapped with the edge instead (its cache stays, to be copied)."""
        swap = region is self.prefilling
        edge = region[0 if swap else -1]
        if edge is not request:
            src, dst = ([edge.row, request.row], [request.row, edge.row]) if swap else ([edge.row], [request.row])
            self._copy_rows(src, dst)
            region[region.index(request)] = edge
            edge.row, request.row = request.row, edge.row
        region.pop(0 if swap else -1)

    def _copy_rows(self, src: list[int], dst: list[int]) -> None:
        for cache in self.caches:
            cache.copy_rows(src, dst)
        self.drafts[dst], self.draft_probs[dst] = self.drafts[src], self.draft_probs[src]
