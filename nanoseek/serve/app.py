"""The ASGI app of ``nanoseek serve``. Every client error is a 4xx with an OpenAI error object. A client that goes
away (a closed stream, or a dropped connection while waiting) cancels its requests, freeing their cache rows."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from nanoseek.engine import Request as EngineRequest
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from nanoseek.serve.worker import EngineWorker
from nanoseek.tokenizer import Tokenizer

PAGE = Path(__file__).parent / "static" / "index.html"


def usage(requests: list[EngineRequest], n: int) -> dict:
    prompt = sum(len(r.prompt) for r in requests[::n])  # each prompt once (of its n choices), as OpenAI
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def outputs(requests: list[EngineRequest], queue: asyncio.Queue, http: Request | None) -> AsyncIterator[tuple]:
    """The requests' outputs as they come (see ``EngineWorker.submit``). The unfinished ones are cancelled when the
    consumer stops early or (with ``http``, checked each idle second) the client disconnects."""
    left = len(requests)
    try:
        while left:
            try:
                i, text, num_tokens, reason = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    return
                continue
            left -= reason is not None
            yield i, text, num_tokens, reason
    finally:
        for r in requests:
            if not r.finished:
                r.cancelled = True


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(worker: EngineWorker, tok: Tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    async def respond(chat: bool, body, http: Request, prompts: list, max_tokens: int | None, param: str,
                      with_logprobs: bool):
        """Either endpoint's response to ``prompts`` (texts, token ids or chats), ``n`` requests per prompt queued all
        or none: one object, or SSE chunks (per engine output with text, a finish or log-probs; usage; ``[DONE]``)."""
        if body.model != model_name:
            raise APIError(f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model",
                           404, "model_not_found")
        requests, queue = [], asyncio.Queue()  # choice i: requests[i], for prompt i // n
        try:  # the chat template, or the engine (context length, token ids), may refuse a prompt
            for p in prompts:
                p = list(p) if isinstance(p[0], int) else tok.encode_prompt(p)
                budget = max(worker.engine.max_len - len(p), 1) if max_tokens is None else max_tokens
                for _ in range(body.n):
                    params = body.sampling(budget, tok.stop_ids, len(requests))
                    requests.append(worker.submit(p, params, queue, len(requests)))
        except (ValueError, TypeError) as e:
            for r in requests:
                r.cancelled = True
            raise APIError(str(e), param) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion", "model": model_name}

        def choice(i: int, text: str, start: int, stop: int | None, reason: str | None) -> dict:
            ids, values = requests[i].output_ids[start:stop], requests[i].logprobs[start:stop]
            tokens = [tok.decode([t]) for t in ids] if with_logprobs else []
            if chat:
                out = ({"delta": {"content": text} if text else {}} if body.stream
                       else {"message": {"role": "assistant", "content": text}})
                logprobs = {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                                        for t, v in zip(tokens, values)]}
            else:
                out = {"text": text}
                logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": None}
            return {"index": i, **out, "logprobs": logprobs if with_logprobs else None,
                    "finish_reason": "stop" if reason == "cancelled" else reason}

        if not body.stream:
            async for _ in outputs(requests, queue, http):
                pass
            done = [choice(i, r.text, 0, None, r.finish_reason) for i, r in enumerate(requests)]
            return {**head, "choices": done, "usage": usage(requests, body.n)}
        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def events():
            if chat:  # chat streams open with a role chunk
                for i in range(len(requests)):
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            sent = [0] * len(requests)  # tokens already sent per choice
            async for i, text, num_tokens, reason in outputs(requests, queue, None):
                if text or reason is not None or with_logprobs:
                    yield sse({**chunk, "choices": [choice(i, text, sent[i], num_tokens, reason)]})
                    sent[i] = num_tokens
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(requests, body.n)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.exception_handler(APIError)
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(HTTPException)
    async def _error(_, e: Exception):
        if isinstance(e, RequestValidationError):
            e = validation_error(e.errors()[0])
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
        return await respond(False, body, http, prompts, body.max_tokens, "prompt", body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        chat = [m.as_dict() for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(True, body, http, [chat], max_tokens, "messages", body.logprobs)

    return app
