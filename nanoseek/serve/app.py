"""The ASGI app of ``nanoseek serve``. Every client error is a 4xx with an OpenAI error object. A client that goes
away cancels its requests at once, freeing their cache rows."""

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
from starlette.types import ASGIApp, Receive, Scope, Send

from nanoseek.engine import Request as EngineRequest
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from nanoseek.serve.worker import EngineWorker
from nanoseek.tokenizer import Tokenizer, encode_checked

PAGE = Path(__file__).parent / "static" / "index.html"


def usage(requests: list[EngineRequest], n: int) -> dict:
    prompt = sum(len(r.prompt) for r in requests[::n])  # each prompt once (of its n choices), as OpenAI
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def limit_body(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """``app`` with a 413 for bodies over ``max_bytes`` (chunked or not), read first holding at most ``max_bytes``; a
    larger one is drained (up to 16x) so that the client reads the 413."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        chunks, size, message = [], 0, {"more_body": scope["type"] == "http"}
        while message.get("more_body") and size <= 16 * max_bytes:
            size += len((message := await receive()).get("body", b""))
            chunks += [message.get("body", b"")] if size <= max_bytes else []
        if size > max_bytes:
            e = APIError(f"request body over --max-request-bytes ({max_bytes:,} bytes)", None, 413, "request_too_large")
            return await JSONResponse(e.body, 413)(scope, receive, send)
        replay = [{**message, "body": b"".join(chunks)}] if scope["type"] == "http" else []
        await app(scope, lambda: asyncio.sleep(0, replay.pop()) if replay else receive(), send)  # the body, then events

    return limited


async def outputs(requests: list[EngineRequest], queue: asyncio.Queue, http: Request) -> AsyncIterator[tuple]:
    """The requests' outputs as they come (see ``EngineWorker.submit``). The unfinished ones are cancelled when the
    consumer stops early or the client disconnects, at once: a watcher puts None on the queue."""

    async def watch() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    watcher, left = asyncio.ensure_future(watch()), len(requests)
    try:
        while left and (item := await queue.get()) is not None:
            left -= item[3] is not None
            yield item
    finally:
        watcher.cancel()
        for r in requests:
            if not r.finished:
                r.cancelled = True


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(worker: EngineWorker, tok: Tokenizer, model_name: str, max_request_bytes: int = 2**20,
               allow_unknown_chars: bool = False) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(limit_body, max_bytes=max_request_bytes)
    created, max_len = int(time.time()), worker.engine.max_len
    longest = max(map(len, tok.tok.get_vocab()))  # characters of the longest token: a bound on characters per token

    def encode(prompt: str | list, param: str) -> list[int]:
        if isinstance(prompt[0], int):
            return list(prompt)
        if len(text := tok.prompt_text(prompt)) > max_len * longest:  # cannot fit: refused before tokenizing
            raise ValueError(f"{param}: {len(text):,} characters, more than {max_len} tokens (the context) of at most "
                             f"{longest} characters each can hold; shorten it")
        return encode_checked(tok, text, param, add_bos=True, allow_unknown=allow_unknown_chars,
                             parse_specials=text is not prompt)

    async def respond(chat: bool, body, http: Request, prompts: list, max_tokens: int | None, param: str,
                      with_logprobs: bool):
        """Either endpoint's response to ``prompts`` (texts, token ids or chats), ``n`` requests per prompt queued all
        or none: one object, or SSE chunks (per engine output with text, a finish or log-probs; usage; ``[DONE]``)."""
        if body.model != model_name:
            raise APIError(f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model",
                           404, "model_not_found")
        if body.stream_options is not None and not body.stream:
            raise APIError("stream_options is only allowed with stream: true", "stream_options")
        requests, queue = [], asyncio.Queue()  # choice i: requests[i], for prompt i // n
        try:  # the chat template, the tokenizer or the engine (context length, token ids) may refuse a prompt
            for ids in await asyncio.to_thread(lambda: [encode(p, param) for p in prompts]):  # off the event loop
                budget = max(max_len - len(ids), 1) if max_tokens is None else max_tokens
                for _ in range(body.n):
                    params = body.sampling(budget, tok.stop_ids, len(requests))
                    requests.append(worker.submit(ids, params, queue, len(requests)))
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
            async for i, text, num_tokens, reason in outputs(requests, queue, http):
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
        return Response(json.dumps(e.body), e.status, media_type="application/json")  # ASCII: surrogates escaped

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
                "max_model_len": max_len}
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
