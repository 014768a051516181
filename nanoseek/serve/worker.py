"""The engine on its own thread, and the bridge to asyncio: requests' outputs arrive on an ``asyncio.Queue``.
The thread steps the engine while there is work, else sleeps on an event; torch releases the GIL inside its
kernels, so the event loop keeps serving HTTP while a step runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanoseek.engine import Engine, Request, SamplingParams
from nanoseek.serve.protocol import APIError

log = logging.getLogger("nanoseek.serve")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake, self.stopping, self.draining, self.abort_at = threading.Event(), False, False, float("inf")
        self.registry = CollectorRegistry()
        self.registry.register(self)  # the engine's state, read at each scrape by ``collect``
        self.finished = Counter("nanoseek_requests_finished", "requests finished, by finish reason",
                                ["finish_reason"], registry=self.registry)
        for reason in ("stop", "length", "cancelled", "error"):
            self.finished.labels(reason)  # each reported from the start, at 0
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=BUCKETS, registry=self.registry)
        self.tpot = Histogram("nanoseek_time_per_output_token_seconds", "time per output token after the first",
                              buckets=BUCKETS, registry=self.registry)
        self.thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)

    def submit(self, prompt: Sequence[int], params: SamplingParams, queue: asyncio.Queue, index: int) -> Request:
        """Queue a request; the engine thread puts (``index``, new text, tokens so far, finish reason) on ``queue``."""
        if self.draining:
            raise APIError("the server is shutting down; retry later", None, 503, "shutting_down", "server_error")
        loop = asyncio.get_running_loop()

        def on_output(r: Request, text: str) -> None:
            if r.finished:
                self.finished.labels(r.finish_reason).inc()
                if r.first_token_time is not None:
                    self.ttft.observe(r.first_token_time - r.arrival)
                    if len(r.output_ids) > 1:
                        self.tpot.observe((r.finish_time - r.first_token_time) / (len(r.output_ids) - 1))
            loop.call_soon_threadsafe(queue.put_nowait, (index, text, len(r.output_ids), r.finish_reason))

        request = self.engine.add(prompt, params, want_text=True, on_output=on_output)
        self.wake.set()
        return request

    def _loop(self) -> None:
        while not self.stopping:
            if time.monotonic() >= self.abort_at:  # the shutdown grace is over: end what still runs
                self.engine.abort("cancelled")
            if not self.engine.has_work():
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # a bug, not a client error: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self.engine.abort("error")

    def drain(self, grace_s: float) -> None:
        """Admit nothing more (``submit`` answers 503); after ``grace_s`` end the requests still running."""
        self.draining, self.abort_at = True, time.monotonic() + grace_s

    def stop(self) -> None:
        """Finish nothing more: fail the requests in flight (their handlers answer at once), end the thread."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)
        self.engine.abort("cancelled")

    def collect(self):
        """The engine's gauges and totals (and MTP drafts verified and accepted per depth), read at each scrape."""
        e = self.engine
        for name, value, help_text in (
            ("nanoseek_requests_running", len(e.decoding) + len(e.prefilling), "requests prefilling or decoding"),
            ("nanoseek_requests_waiting", len(e.waiting), "requests waiting for cache space"),
            ("nanoseek_cache_slots_used", e.slots_used, "cache slots (sequences) in use"),
            ("nanoseek_cache_slots", e.num_slots, "cache slots (sequences) in the memory budget"),
            ("nanoseek_cache_tokens_used", e.tokens_cached, "tokens held in the KV cache"),
            ("nanoseek_cache_bytes", sum(c.nbytes for c in e.caches), "bytes of the KV caches (MTP's included)"),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("nanoseek_prompt_tokens", "prompt tokens admitted", value=e.prompt_tokens)
        yield CounterMetricFamily("nanoseek_generation_tokens", "tokens generated", value=e.generated_tokens)
        for name, counts in (("proposed", e.spec_proposed), ("accepted", e.spec_accepted)):
            family = CounterMetricFamily(f"nanoseek_spec_draft_tokens_{name}", f"MTP draft tokens {name}, by depth",
                                         labels=["depth"])
            for d, count in enumerate(counts):
                family.add_metric([str(d + 1)], count)
            yield family
