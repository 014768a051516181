"""The ASGI app: OpenAI-compatible routes over the engine, SSE streaming, health, Prometheus metrics, the chat page.

Every client error is a 4xx with an OpenAI error object; the handlers never let a bad request reach the engine.
A client that goes away (a closed stream, or a dropped connection while waiting) cancels its requests, and the
engine frees their cache rows at its next step. Both endpoints answer through one builder (``respond``); a
``Shape`` says how each writes a choice's text and log-probs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanoseek.engine import Request as EngineRequest
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from nanoseek.serve.worker import EngineWorker, Output
from nanoseek.tokenizer import Tokenizer

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


@dataclass(frozen=True)
class Shape:
    """How an endpoint writes a choice: its object names, its text (``text(s, streamed)``) and its log-probs
    (``logprobs(tokens, values)``); chat streams open with a role chunk."""

    object: str
    chunk_object: str
    id_prefix: str
    text: Callable[[str, bool], dict]
    logprobs: Callable[[list[str], list[float]], dict]
    role_chunk: bool = False


COMPLETION = Shape("text_completion", "text_completion", "cmpl", lambda s, streamed: {"text": s},
                   lambda tokens, values: {"tokens": tokens, "token_logprobs": values, "top_logprobs": None,
                                           "text_offset": None})
CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl",
             lambda s, streamed: ({"delta": {"content": s} if s else {}} if streamed
                                  else {"message": {"role": "assistant", "content": s}}),
             lambda tokens, values: {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                                                  "top_logprobs": []} for t, v in zip(tokens, values)]},
             role_chunk=True)


def usage(choices: list[Choice]) -> dict:
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())  # each prompt once, as OpenAI
    completion = sum(len(c.request.output_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merged(choices: list[Choice], http: Request | None) -> AsyncIterator[tuple[Choice, Output]]:
    """Every choice's outputs as they come. The unfinished ones are cancelled when the consumer stops early or
    (with ``http``, checked each second) the client disconnects."""
    pending = {asyncio.ensure_future(c.queue.get()): c for c in choices}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if not done and http is not None and await http.is_disconnected():
                return
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


async def respond(shape: Shape, body, http: Request, choices: list[Choice], tok: Tokenizer, model_name: str,
                  with_logprobs: bool):
    """The response of either endpoint: one object, or SSE chunks (one per engine output with text, a finish or
    log-probs; usage if asked; ``[DONE]``)."""
    head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
            "model": model_name}

    def choice(c: Choice, text: str, start: int, stop: int, reason: str | None, streamed: bool) -> dict:
        ids, values = c.request.output_ids[start:stop], c.request.logprobs[start:stop]
        logprobs = shape.logprobs([tok.decode([t]) for t in ids], values) if with_logprobs else None
        return {"index": c.index, **shape.text(text, streamed), "logprobs": logprobs,
                "finish_reason": "stop" if reason == "cancelled" else reason}

    if not body.stream:
        async for _ in merged(choices, http):
            pass
        return {**head, "choices": [choice(c, c.text, 0, len(c.request.output_ids), c.finish_reason, False)
                                    for c in choices], "usage": usage(choices)}
    chunk = {**head, "object": shape.chunk_object}

    async def events():
        if shape.role_chunk:
            for c in choices:
                yield sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        sent = {c.index: 0 for c in choices}  # tokens already sent per choice
        async for c, out in merged(choices, None):
            if out.text or out.finish_reason is not None or with_logprobs:
                yield sse({**chunk, "choices": [choice(c, out.text, sent[c.index], out.num_tokens,
                                                       out.finish_reason, True)]})
                sent[c.index] = out.num_tokens
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(choices)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def start(worker: EngineWorker, tok: Tokenizer, prompts: list[list[int]], body, max_tokens: int | None,
          param: str) -> list[Choice]:
    """Check every prompt against the context and the vocabulary, then queue ``n`` requests per prompt (all or
    none)."""
    engine = worker.engine
    for p in prompts:
        room = engine.max_len - len(p)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(f"this model's maximum context length is {engine.max_len} tokens; the prompt has "
                           f"{len(p)} tokens and max_tokens is {max_tokens}: shorten the prompt or max_tokens",
                           param, code="context_length_exceeded")
        vocab = engine.model.config.vocab_size
        if bad := [t for t in p if not 0 <= t < vocab]:
            raise APIError(f"the prompt has token ids outside [0, {vocab}): {bad[:5]}", "prompt")
    choices = []
    for i, p in enumerate(prompts):
        budget = max_tokens if max_tokens is not None else engine.max_len - len(p)
        for j in range(body.n):
            index = i * body.n + j
            queue: asyncio.Queue[Output] = asyncio.Queue()
            try:
                request = worker.submit(p, body.sampling(budget, tok.stop_ids, index), queue)
            except ValueError as e:
                for c in choices:
                    c.request.cancelled = True
                raise APIError(str(e)) from None
            choices.append(Choice(index, i, request, queue, len(p)))
    return choices


def create_app(worker: EngineWorker, tok: Tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

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
        text, content_type = worker.metrics()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": worker.engine.max_len}
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", "model", 404,
                           "model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            p = [p]
        prompts = [tok.encode_prompt(x) if isinstance(x, str) else list(x) for x in p]
        choices = start(worker, tok, prompts, body, body.max_tokens, "prompt")
        return await respond(COMPLETION, body, http, choices, tok, model_name, body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model(body.model)
        try:
            prompt = tok.encode_prompt([m.as_dict() for m in body.messages])
        except (ValueError, TypeError) as e:
            raise APIError(str(e), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = start(worker, tok, [prompt], body, max_tokens, "messages")
        return await respond(CHAT, body, http, choices, tok, model_name, body.logprobs)

    return app
