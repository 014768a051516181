"""``nanoseek serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching engine,
with SSE streaming, ``/health``, Prometheus ``/metrics`` and a chat page at ``/``.

``app.py`` holds the routes, ``protocol.py`` the request checks, ``worker.py`` the engine thread and metrics,
``text.py`` the tokenizer and chat template, ``static/index.html`` the page. This module is the command line; it
imports the web stack only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face format model directory (with tokenizer.json), "
                                                       "or a nanoseek run directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cache-memory", type=float, default=1024, metavar="MB",
                        help="KV-cache budget in MiB; with --max-len it fixes how many sequences run at once")
    parser.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together")
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens per sequence, prompt + output (default: the model's context, at most 4096)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens prefilled per step (longer prompts are split so decodes keep going)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if any)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weights and cache dtype (default: as saved)")
    parser.add_argument("--name", default=None, help="model id in the API (default: the directory name)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build(args: argparse.Namespace):
    """(worker, codec, model name, a summary line) from the command-line arguments."""
    import torch

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.engine import Engine, bytes_per_token, slots_for_budget
    from nanoseek.model.transformer import Transformer
    from nanoseek.serve.text import TextCodec
    from nanoseek.serve.worker import EngineWorker

    directory = resolve_model_dir(args.model)
    codec = TextCodec(directory)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = Transformer.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    if codec.eos_id is None:
        codec.eos_id = model.config.eos_token_id
    c = model.config
    max_len = args.max_len or min(c.max_position_embeddings, 4096)
    if not 1 < max_len <= c.max_position_embeddings:
        raise ValueError(f"--max-len must be in [2, {c.max_position_embeddings}] (the model's context), got {max_len}")
    if args.max_batch < 1 or args.prefill_chunk < 1 or args.cache_memory <= 0:
        raise ValueError("--max-batch, --prefill-chunk and --cache-memory must be positive")
    per_token = bytes_per_token(model)
    budget = int(args.cache_memory * 2**20)
    fit = slots_for_budget(model, budget, max_len)
    if fit < 1:
        raise ValueError(f"--cache-memory {args.cache_memory:g} MiB holds {budget // per_token} tokens, less than "
                         f"one sequence of --max-len {max_len}: raise it or lower --max-len")
    engine = Engine(model, min(fit, args.max_batch), max_len, prefill_tokens=args.prefill_chunk, decode=codec.decode)
    what = "c_KV + k_R" if c.attention_type == "mla" else "K + V"
    summary = (f"cache: {args.cache_memory:g} MiB at {per_token:,} bytes/token ({what}, {c.num_hidden_layers} layers) "
               f"= {budget // per_token:,} tokens = {fit} sequences of {max_len} tokens; "
               f"running {engine.num_slots} at once (--max-batch {args.max_batch})")
    return EngineWorker(engine), codec, args.name or Path(args.model).resolve().name, summary


def run(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    import uvicorn

    from nanoseek.serve.app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGINT/SIGTERM start uvicorn's graceful shutdown; unlike uvicorn's own, the signal is not raised
            again afterwards, so the engine thread is stopped below and the command exits 0."""
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    worker, codec, name, summary = build(args)
    print(summary, flush=True)
    print(f"serving {name!r} on http://{args.host}:{args.port}  (chat page at /, OpenAI API at /v1)", flush=True)
    worker.start()
    config = uvicorn.Config(create_app(worker, codec, name), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=10)
    try:
        Server(config).run()  # SIGINT/SIGTERM: stop accepting, let requests in flight finish (10 s)
    finally:
        worker.stop()
    print("server stopped", file=sys.stderr, flush=True)
    return 0
