"""The engine on its own thread, and the bridge to asyncio: each request's outputs arrive on an ``asyncio.Queue``.

The thread steps the engine while there is work and sleeps on an event otherwise; torch releases the GIL inside
its kernels, so the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.engine import Engine, Request, SamplingParams

log = logging.getLogger("nanoseek.serve")


@dataclass(frozen=True)
class Output:
    """What one engine callback tells a handler: new text, tokens generated so far, and the finish reason."""

    text: str
    num_tokens: int
    finish_reason: str | None


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of seconds."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, c in zip([*map(str, self.BUCKETS), "+Inf"], self.counts):
            cumulative += c
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.ttft, self.tpot = Histogram(), Histogram()
        # every key present from the start: /metrics reads it while the engine thread counts (no resizing)
        self.finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)
        self.thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams, queue: asyncio.Queue) -> Request:
        """Queue a request; its ``Output``s are put on ``queue`` (from the engine thread, thread-safely)."""
        loop = asyncio.get_running_loop()

        def on_output(request: Request, text: str) -> None:
            out = Output(text, len(request.output_ids), request.finish_reason)
            if request.finished:
                self._observe(request)
            loop.call_soon_threadsafe(queue.put_nowait, out)

        request = self.engine.add(prompt, params, want_text=True, on_output=on_output)
        self.wake.set()
        return request

    def _observe(self, r: Request) -> None:
        self.finished[r.finish_reason] += 1
        if r.first_token_time is not None:
            self.ttft.observe(r.first_token_time - r.arrival)
            if len(r.output_ids) > 1:
                self.tpot.observe((r.finish_time - r.first_token_time) / (len(r.output_ids) - 1))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # a bug, not a client error: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all("error")

    def _fail_all(self, reason: str) -> None:
        e = self.engine
        with e.lock:
            requests = [*e.waiting, *e.decoding, *(q for r in e.prefilling for q in (r, *r.followers))]
            e.waiting.clear()
        e.decoding.clear()
        e.prefilling.clear()
        for r in requests:
            if not r.finished:
                e._emit(r, r.finish(reason))

    def stop(self) -> None:
        """Finish nothing more: fail the requests in flight (their handlers answer at once), end the thread."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)
        self._fail_all("cancelled")

    def metrics(self) -> str:
        e = self.engine
        lines = []

        def gauge(name, value, help_text, kind="gauge"):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"])

        gauge("nanoseek_requests_running", len(e.decoding) + len(e.prefilling), "requests prefilling or decoding")
        gauge("nanoseek_requests_waiting", len(e.waiting), "requests waiting for cache space")
        gauge("nanoseek_cache_slots_used", e.slots_used, "cache slots (sequences) in use")
        gauge("nanoseek_cache_slots_total", e.num_slots, "cache slots (sequences) in the memory budget")
        gauge("nanoseek_cache_tokens_used", e.tokens_cached, "tokens held in the KV cache")
        gauge("nanoseek_cache_bytes_total", e.cache.nbytes, "bytes of the KV cache")
        gauge("nanoseek_prompt_tokens_total", e.prompt_tokens, "prompt tokens admitted", "counter")
        gauge("nanoseek_generation_tokens_total", e.generated_tokens, "tokens generated", "counter")
        lines += ["# HELP nanoseek_requests_finished_total requests finished, by finish reason",
                  "# TYPE nanoseek_requests_finished_total counter"]
        lines += [f'nanoseek_requests_finished_total{{finish_reason="{k}"}} {v}'
                  for k, v in self.finished.items()]
        lines += self.ttft.lines("nanoseek_time_to_first_token_seconds", "time from arrival to the first token")
        lines += self.tpot.lines("nanoseek_time_per_output_token_seconds", "time per output token after the first")
        return "\n".join(lines) + "\n"
