"""A tiny model with a byte-level BPE tokenizer (multi-byte UTF-8 in its vocabulary) served by `nanoseek serve` in a
subprocess on a free 127.0.0.1 port: shared by test_serve.py and test_chat_page.py."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.tokenizer import Tokenizer

TEXT = "naïve café — 日本語のテキスト, emoji 🙂🚀 and ascii words, Ünïcödé façade, 中文字符 ✓ ∑ ≠ ∞.\n" * 20
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, directory: Path, model: Transformer, tokenizer: Tokenizer, proc: subprocess.Popen, port: int,
                 log: Path):
        self.directory, self.model, self.tokenizer, self.proc, self.log = directory, model, tokenizer, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.name = directory.name


def tiny_model(directory: Path, tok: Tokenizer | None = None) -> tuple[Transformer, Tokenizer]:
    """A tiny model with two MTP modules (a byte-level BPE tokenizer unless ``tok``), saved in ``directory``."""
    tok = tok or Tokenizer.train_bpe([TEXT], vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.3, num_nextn_predict_layers=2,
                                eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    model = Transformer(config).eval()
    model.save_pretrained(directory)
    tok.save(directory)
    return model, tok


def serve_command(directory: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port),
            "--cache-memory", "1", "--max-batch", "24", "--prefill-chunk", "16", "--device", "cpu", *flags]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_server(tmp: Path, *flags: str, like: Served | None = None, tok: Tokenizer | None = None) -> Served:
    """A server of a new ``tiny_model`` (or of ``like``'s model), with extra ``flags``."""
    if like is None:
        directory = tmp / "tiny-bpe"
        model, tok = tiny_model(directory, tok)
    else:
        directory, model, tok = like.directory, like.model, like.tokenizer
    port = free_port()
    with open(tmp / "server.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(serve_command(directory, port, *flags), stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                cwd=tmp)
    served = Served(directory, model, tok, proc, port, tmp / "server.log")
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{served.log.read_text()}")
        try:
            if httpx.get(served.url + "/health", timeout=1).status_code == 200:
                return served
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not answer /health in 120 s:\n{served.log.read_text()}")


def stop_server(served: Served, timeout: float = 30) -> int:
    """SIGTERM, then the exit code (the server must exit by itself within ``timeout``)."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        raise
