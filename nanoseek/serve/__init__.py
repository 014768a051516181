"""``nanoseek serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching engine,
with SSE streaming, ``/health``, Prometheus ``/metrics`` and a chat page at ``/``. This module is the command line;
it imports the web stack only when the command runs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoseek import cli_args
from nanoseek.cli_args import option


@dataclass(frozen=True)
class ServeConfig:
    model: str = option(help="Hugging Face format model directory (with tokenizer.json), or a nanoseek run directory")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on", min=0, max=65535)
    cache_memory: float = option(1024.0, "KV-cache budget in MiB (sets how many sequences fit)", gt=0, metavar="MB")
    max_batch: int = option(64, "most sequences decoded together", min=1)
    max_model_len: int | None = option(None, "tokens per sequence (prompt + output); unset: min(context, 4096)", min=2)
    prefill_chunk: int = option(512, "prompt tokens prefilled per step (longer prompts are split)", min=1)
    device: str | None = option(None, "torch device; unset: cuda if available, else cpu")
    dtype: str | None = option(None, "weights/cache dtype; unset: as saved", choices=("float32", "bfloat16", "float16"))
    name: str | None = option(None, "model id in the API; unset: the directory name")
    speculative: bool = option(False, "draft with the model's MTP modules and verify in the next forward")
    max_request_bytes: int = option(2**20, "larger bodies get 413 (1 MiB: a 4096-token prompt 30x over)", min=1)
    allow_unknown_chars: bool = option(False, "let characters the tokenizer lacks become <unk> (else a 400)")
    shutdown_timeout_s: float = option(10.0, "on SIGTERM/Ctrl-C: seconds the requests in flight get to finish before "
                                       "they end (finish_reason 'stop')", min=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    import signal

    import torch
    import uvicorn

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.distributed import device_of
    from nanoseek.engine import Engine, bytes_per_token, slots_for_budget
    from nanoseek.model.transformer import Transformer
    from nanoseek.serve.app import create_app
    from nanoseek.serve.worker import EngineWorker
    from nanoseek.tokenizer import Tokenizer

    cfg = cli_args.from_args(ServeConfig, args)
    cli_args.check_ranges(cfg)
    directory = resolve_model_dir(cfg.model)
    tok = Tokenizer.load(directory)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model = Transformer.from_pretrained(directory, dtype=dtype).to(device_of(cfg.device)).eval()
    c = model.config
    if tok.eos_id is None:
        tok.eos_id = c.eos_token_id
    max_len = cfg.max_model_len or min(c.max_position_embeddings, 4096)
    if max_len > c.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_len}: more than the model's context, {c.max_position_embeddings}")
    per_token, budget = bytes_per_token(model), int(cfg.cache_memory * 2**20)
    fit = slots_for_budget(model, budget, max_len, speculative=cfg.speculative)
    engine = Engine(model, min(fit, cfg.max_batch), max_len, prefill_tokens=cfg.prefill_chunk, decode=tok.decode,
                    speculative=cfg.speculative)
    what = "c_KV + k_R" if c.attention_type == "mla" else "K + V"
    print(f"cache: {cfg.cache_memory:g} MiB at {per_token:,} bytes/token ({what}, {c.num_hidden_layers} layers) "
          f"= {budget // per_token:,} tokens = {fit} sequences of {max_len} tokens; "
          f"running {engine.num_slots} at once (--max-batch {cfg.max_batch})", flush=True)
    name = cfg.name or Path(cfg.model).resolve().name
    worker = EngineWorker(engine)
    worker.thread.start()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # a port that is taken: uvicorn logs it and exits 3
            await super().startup(sockets)
            port = self.servers[0].sockets[0].getsockname()[1]  # --port 0: the one the system chose
            print(f"serving {name!r} on http://{cfg.host}:{port}  (chat page at /, OpenAI API at /v1)", flush=True)

        async def shutdown(self, sockets=None) -> None:  # new requests get 503; the rest end after the grace
            worker.drain(cfg.shutdown_timeout_s)
            await super().shutdown(sockets)

    app = create_app(worker, tok, name, cfg.max_request_bytes, cfg.allow_unknown_chars)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=cfg.shutdown_timeout_s + 5)  # +5 s: to send the finish chunks
    # SIGINT/SIGTERM: uvicorn drains the requests in flight, then re-raises the signal: ignored here, so exit 0
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run()
    finally:
        worker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("server stopped", file=sys.stderr, flush=True)
    return 0
