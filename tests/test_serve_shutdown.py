"""`nanoseek serve` as a process: the address printed once the port is bound (a taken port is an error, no address);
SIGTERM stops admitting (503), ends the streams still running after the grace with a finish chunk and [DONE], exits 0
without tracebacks; characters a (character-level) tokenizer lacks are a 400, not <unk>."""

import json
import re
import signal
import socket
import subprocess

import httpx
import pytest
from serve_fixture import ENV, serve_command, start_server, stop_server, tiny_model

from nanoseek.tokenizer import Tokenizer

openai = pytest.importorskip("openai")


@pytest.mark.slow  # two server processes
def test_address_printed_once_bound_and_a_taken_port_is_an_error(tmp_path):
    tiny_model(tmp_path / "m")
    first = subprocess.Popen(serve_command(tmp_path / "m", 0), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=ENV)
    try:
        lines = []
        while not (found := re.search(r"^serving 'm' on http://127.0.0.1:(\d+) ", lines[-1] if lines else "")):
            lines.append(first.stdout.readline())
            assert lines[-1], "".join(lines)  # it exited without the line
        port = int(found.group(1))  # --port 0: the port the system chose, bound
        assert port and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        second = subprocess.run(serve_command(tmp_path / "m", port), capture_output=True, text=True, env=ENV,
                                timeout=300)
        assert second.returncode != 0 and "serving" not in second.stdout, second.stdout + second.stderr
        assert "address already in use" in second.stdout + second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_sigterm_refuses_new_requests_and_ends_long_streams_with_done(tmp_path):
    served = start_server(tmp_path, "--max-batch", "1", "--shutdown-timeout-s", "1", tok=Tokenizer.char())
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)
    for prompt in ("snow \u2603", [{"role": "user", "content": "snow \u2603"}]):  # a character not in the vocabulary
        with pytest.raises(openai.BadRequestError, match=r"U\+2603") as e:
            if isinstance(prompt, str):
                client.completions.create(model=served.name, prompt=prompt, max_tokens=2)
            else:
                client.chat.completions.create(model=served.name, messages=prompt, max_tokens=2)
        assert e.value.body["param"] == ("prompt" if isinstance(prompt, str) else "messages")
    port = int(served.url.rsplit(":", 1)[1])
    late = socket.create_connection(("127.0.0.1", port))  # a request whose body arrives after SIGTERM
    body = json.dumps({"model": served.name, "prompt": "ab", "max_tokens": 4}).encode()
    late.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d"
                 b"\r\n\r\n%s" % (len(body), body[:5]))
    long = {"model": served.name, "prompt": "ab", "max_tokens": 250, "n": 16, "temperature": 1, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # 16 x 250 tokens, one at a time: many seconds
    events = []
    with httpx.stream("POST", served.url + "/v1/completions", json=long, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        events.append(next(lines))  # it is streaming
        served.proc.send_signal(signal.SIGTERM)
        while True:  # until the server stops listening: shutting down
            try:
                socket.create_connection(("127.0.0.1", port)).close()
            except ConnectionError:  # refused, or reset when the listening socket closed with it queued
                break
        late.sendall(body[5:])
        late.settimeout(30)
        answer = b"".join(iter(lambda: late.recv(65536), b"")).decode()  # the server closes it after the answer
        events += list(lines)
    late.close()
    assert answer.startswith("HTTP/1.1 503"), answer
    error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error" and "param" in error
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == set(range(16))  # every choice ends with a finish_reason chunk, the cut ones too
    assert chunks[-1]["usage"]["completion_tokens"] < 16 * 250  # ended by the grace, not by length
    assert stop_server(served, timeout=60) == 0
    log = served.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log and "server stopped" in log, log
