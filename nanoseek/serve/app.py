"""The ASGI app: OpenAI-compatible routes over the engine, SSE streaming, health, Prometheus metrics, the chat page.

Every client error is a 4xx with an OpenAI error object; the handlers never let a bad request reach the engine.
A client that goes away (a closed stream, or a dropped connection while waiting) cancels its requests, and the
engine frees their cache rows at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanoseek.engine import Request as EngineRequest
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from nanoseek.serve.text import TextCodec
from nanoseek.serve.worker import EngineWorker, Output

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class Choice:
    """One engine request and what its handler has collected from it."""

    index: int
    prompt_index: int
    request: EngineRequest
    queue: asyncio.Queue
    prompt_tokens: int
    text: str = ""
    finish_reason: str | None = None


def create_app(worker: EngineWorker, codec: TextCodec, model_name: str) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    engine = worker.engine

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), status=e.status_code, type=kind).body(), status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(worker.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": engine.max_len}
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", "model", 404,
                           "model_not_found")

    def start(prompts: list[list[int]], body, max_tokens: int | None) -> list[Choice]:
        """Validate every prompt against the context, then queue ``n`` requests per prompt (all or none)."""
        for p in prompts:
            room = engine.max_len - len(p)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise APIError(f"this model's maximum context length is {engine.max_len} tokens; the prompt has "
                               f"{len(p)} tokens and max_tokens is {max_tokens}: shorten the prompt or max_tokens",
                               "messages" if isinstance(body, ChatRequest) else "prompt",
                               code="context_length_exceeded")
            bad = [t for t in p if not 0 <= t < engine.model.config.vocab_size]
            if bad:
                raise APIError(f"the prompt has token ids outside [0, {engine.model.config.vocab_size}): {bad[:5]}",
                               "prompt")
        eos = () if codec.eos_id is None else (codec.eos_id,)
        choices = []
        for i, p in enumerate(prompts):
            budget = max_tokens if max_tokens is not None else engine.max_len - len(p)
            for j in range(body.n):
                index = i * body.n + j
                queue: asyncio.Queue[Output] = asyncio.Queue()
                try:
                    request = worker.submit(p, body.sampling(budget, eos, index), queue)
                except ValueError as e:
                    for c in choices:
                        c.request.cancelled = True
                    raise APIError(str(e)) from None
                choices.append(Choice(index, i, request, queue, len(p)))
        return choices

    def usage(choices: list[Choice]) -> dict:
        prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())  # each prompt once, as OpenAI
        completion = sum(len(c.request.output_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(choices: list[Choice], http: Request) -> None:
        """Wait for every choice to finish; cancel them all if the client goes away."""
        try:
            for c in choices:
                while c.finish_reason is None:
                    try:
                        out = await asyncio.wait_for(c.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            raise asyncio.CancelledError from None
                        continue
                    c.text += out.text
                    c.finish_reason = out.finish_reason
        finally:
            for c in choices:
                if c.finish_reason is None:
                    c.request.cancelled = True

    async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Output]]:
        """Every choice's outputs as they come; cancels the unfinished ones when the consumer stops early."""
        pending = {asyncio.ensure_future(c.queue.get()): c for c in choices}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    c = pending.pop(task)
                    out = task.result()
                    c.text += out.text
                    c.finish_reason = out.finish_reason
                    if out.finish_reason is None:
                        pending[asyncio.ensure_future(c.queue.get())] = c
                    yield c, out
        finally:
            for task in pending:
                task.cancel()
            for c in choices:
                if c.finish_reason is None:
                    c.request.cancelled = True

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def reason(r: str | None) -> str | None:
        return "stop" if r == "cancelled" else r

    async def respond(body, http: Request, choices: list[Choice], head: dict, chunk: dict,
                      delta: Callable[[Choice, Output, int], dict], final: Callable[[Choice], dict],
                      with_logprobs: bool, opening: Sequence[dict] = ()):
        """The response: SSE chunks (``delta`` per engine output, usage if asked, ``[DONE]``) or one object."""
        if not body.stream:
            await collect(choices, http)
            return {**head, "choices": [final(c) for c in choices], "usage": usage(choices)}

        async def events():
            for obj in opening:
                yield sse(obj)
            seen = {c.index: 0 for c in choices}  # tokens already sent per choice
            async for c, out in merged(choices):
                if out.text or out.finish_reason is not None or with_logprobs:
                    yield sse({**chunk, "choices": [delta(c, out, seen[c.index])]})
                    seen[c.index] = out.num_tokens
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ /v1/completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [codec.encode(p)]
        elif isinstance(p[0], str):
            prompts = [codec.encode(s) for s in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        choices = start(prompts, body, body.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}

        def logprobs(c: Choice, start: int, stop: int) -> dict | None:
            if body.logprobs is None:
                return None
            ids = c.request.output_ids[start:stop]
            return {"tokens": [codec.decode([t]) for t in ids], "token_logprobs": c.request.logprobs[start:stop],
                    "top_logprobs": None, "text_offset": None}

        def delta(c: Choice, out: Output, start: int) -> dict:
            return {"index": c.index, "text": out.text, "logprobs": logprobs(c, start, out.num_tokens),
                    "finish_reason": reason(out.finish_reason)}

        def final(c: Choice) -> dict:
            return {"index": c.index, "text": c.text, "logprobs": logprobs(c, 0, len(c.request.output_ids)),
                    "finish_reason": reason(c.finish_reason)}

        return await respond(body, http, choices, head, head, delta, final, body.logprobs is not None)

    # ------------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model(body.model)
        try:
            text = codec.render_chat([m.as_dict() for m in body.messages])
        except (ValueError, TypeError) as e:
            raise APIError(str(e), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = start([codec.encode(text)], body, max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": now, "model": model_name}

        def logprobs(c: Choice, start: int, stop: int) -> dict | None:
            if not body.logprobs:
                return None
            ids = c.request.output_ids[start:stop]
            content = []
            for t, lp in zip(ids, c.request.logprobs[start:stop]):
                s = codec.decode([t])
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
            return {"content": content}

        def delta(c: Choice, out: Output, start: int) -> dict:
            return {"index": c.index, "delta": {"content": out.text} if out.text else {},
                    "logprobs": logprobs(c, start, out.num_tokens), "finish_reason": reason(out.finish_reason)}

        def final(c: Choice) -> dict:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs(c, 0, len(c.request.output_ids)), "finish_reason": reason(c.finish_reason)}

        chunk = {**head, "object": "chat.completion.chunk"}
        opening = [{**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]} for c in choices]
        return await respond(body, http, choices, head, chunk, delta, final, body.logprobs, opening)

    return app
