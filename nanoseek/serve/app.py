"""The ASGI app: OpenAI-compatible routes over the engine, SSE streaming, health, Prometheus metrics, the chat page.
Every client error is a 4xx with an OpenAI error object. A client that goes away (a closed stream, or a dropped
connection while waiting) cancels its requests; the engine frees their cache rows at its next step."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from nanoseek.engine import Request as EngineRequest
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from nanoseek.serve.worker import EngineWorker, Output
from nanoseek.tokenizer import Tokenizer

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class Choice:
    """One engine request of an HTTP request."""

    index: int
    prompt_index: int
    request: EngineRequest


def usage(choices: list[Choice]) -> dict:
    prompt = sum({c.prompt_index: len(c.request.prompt) for c in choices}.values())  # each prompt once, as OpenAI
    completion = sum(len(c.request.output_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def outputs(choices: list[Choice], queue: asyncio.Queue, http: Request | None
                  ) -> AsyncIterator[tuple[Choice, Output]]:
    """The choices' outputs as they come. The unfinished choices are cancelled when the consumer stops early or
    (with ``http``, checked each idle second) the client disconnects."""
    left = len(choices)
    try:
        while left:
            try:
                out = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    return
                continue
            left -= out.finish_reason is not None
            yield choices[out.index], out
    finally:
        for c in choices:
            if not c.request.finished:
                c.request.cancelled = True


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class API:
    worker: EngineWorker
    tok: Tokenizer
    model_name: str

    async def respond(self, chat: bool, body, http: Request, prompts: list, max_tokens: int | None, param: str,
                      with_logprobs: bool):
        """Either endpoint's response to ``prompts`` (texts, token ids or chats), its ``n`` requests per prompt queued
        all or none: one object, or SSE chunks (one per engine output with text, a finish or log-probs; usage if
        asked; ``[DONE]``). Without ``max_tokens`` a choice may fill the context."""
        if body.model != self.model_name:
            raise APIError(f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", 404, "model_not_found")
        try:
            prompts = [list(p) if isinstance(p[0], int) else self.tok.encode_prompt(p) for p in prompts]
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param) from None
        choices, queue = [], asyncio.Queue()
        for i, p in enumerate(prompts):
            for j in range(body.n):
                index = i * body.n + j
                budget = max(self.worker.engine.max_len - len(p), 1) if max_tokens is None else max_tokens
                try:
                    params = body.sampling(budget, self.tok.stop_ids, index)
                    choices.append(Choice(index, i, self.worker.submit(p, params, queue, index)))
                except ValueError as e:  # the engine checks each prompt against the context and the vocabulary
                    for c in choices:
                        c.request.cancelled = True
                    raise APIError(str(e), param) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(c: Choice, text: str, start: int, stop: int, reason: str | None, streamed: bool) -> dict:
            ids, values = c.request.output_ids[start:stop], c.request.logprobs[start:stop]
            tokens = [self.tok.decode([t]) for t in ids] if with_logprobs else []
            if chat:
                out = ({"delta": {"content": text} if text else {}} if streamed
                       else {"message": {"role": "assistant", "content": text}})
                logprobs = {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                                        for t, v in zip(tokens, values)]}
            else:
                out = {"text": text}
                logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": None}
            return {"index": c.index, **out, "logprobs": logprobs if with_logprobs else None,
                    "finish_reason": "stop" if reason == "cancelled" else reason}

        if not body.stream:
            async for _ in outputs(choices, queue, http):
                pass
            done = [choice(c, c.request.text, 0, len(c.request.output_ids), c.request.finish_reason, False)
                    for c in choices]
            return {**head, "choices": done, "usage": usage(choices)}
        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def events():
            if chat:  # chat streams open with a role chunk
                for c in choices:
                    yield sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            sent = [0] * len(choices)  # tokens already sent per choice
            async for c, out in outputs(choices, queue, None):
                if out.text or out.finish_reason is not None or with_logprobs:
                    yield sse({**chunk, "choices": [choice(c, out.text, sent[c.index], out.num_tokens,
                                                           out.finish_reason, True)]})
                    sent[c.index] = out.num_tokens
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def create_app(worker: EngineWorker, tok: Tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    api, created = API(worker, tok, model_name), int(time.time())

    @app.exception_handler(APIError)
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(HTTPException)
    async def _error(_, e: Exception):
        if isinstance(e, RequestValidationError):
            e = validation_error(list(e.errors()))
        elif isinstance(e, HTTPException):
            e = APIError(str(e.detail), status=e.status_code,
                         type="not_found_error" if e.status_code == 404 else "invalid_request_error")
        return JSONResponse(e.body, status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(worker.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": worker.engine.max_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        return await api.respond(False, body, http, prompts, body.max_tokens, "prompt", body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        chat = [m.as_dict() for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await api.respond(True, body, http, [chat], max_tokens, "messages", body.logprobs)

    return app
