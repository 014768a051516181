"""`nanoseek serve` against the official openai client: completions and chat, plain and streamed; greedy ==
generate(); 20 concurrent requests each equal to its single-request output; a client that disconnects mid-stream;
every bad request a 4xx OpenAI error; metrics; SIGTERM."""

import json
import re
import socket
import threading
import time

import httpx
import pytest
from serve_fixture import start_server, stop_server

from nanoseek import generate
from nanoseek.cli import main

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = start_server(tmp_path_factory.mktemp("serve"))
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def streamed(stream) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            reason = c.finish_reason or reason
    return text, reason


def metric(server, name: str) -> float:
    body = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", body, re.M).group(1))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.name]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    log = server.log.read_text()
    assert "bytes/token (c_KV + k_R, 2 layers)" in log and "sequences of 256 tokens" in log


def test_completion_greedy_equals_generate_and_stream(server, client):
    tok = server.tokenizer
    ids = tok.encode("café 日本", add_bos=True)
    want = generate(server.model, [ids], 24, stop_token_ids=[tok.eos_id])[0]
    r = client.completions.create(model=server.name, prompt="café 日本", max_tokens=24, temperature=0, logprobs=0)
    assert r.choices[0].text == tok.decode(want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_id else "length")
    assert len(r.choices[0].logprobs.token_logprobs) == len(want)
    by_ids = client.completions.create(model=server.name, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    text, reason = streamed(client.completions.create(model=server.name, prompt="café 日本", max_tokens=24,
                                                      temperature=0, stream=True))
    assert (text, reason) == (r.choices[0].text, r.choices[0].finish_reason)


def test_chat_plain_and_streamed_and_template(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße 🙂"}]
    r = client.chat.completions.create(model=server.name, messages=messages, max_tokens=30, temperature=0.8, seed=11)
    rendered = "System: Be brief.\n\nUser: Grüße 🙂\nAssistant: "  # nanoseek's default chat template
    assert r.usage.prompt_tokens == len(server.tokenizer.encode(rendered, add_bos=True))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    text, reason = streamed(client.chat.completions.create(model=server.name, messages=messages, max_tokens=30,
                                                           temperature=0.8, seed=11, stream=True))
    assert (text, reason) == (r.choices[0].message.content, r.choices[0].finish_reason)
    two = client.chat.completions.create(model=server.name, messages=messages, max_tokens=30, temperature=0.8, seed=11,
                                         n=2)
    assert two.choices[0].message.content == r.choices[0].message.content  # choice i samples with seed + i
    assert two.choices[1].message.content != two.choices[0].message.content
    text_parts = [{"type": "text", "text": "Grüße "}, {"type": "text", "text": "🙂"}]
    parts = [messages[0], {"role": "user", "content": text_parts}]
    same = client.chat.completions.create(model=server.name, messages=parts, max_tokens=30, temperature=0.8, seed=11)
    assert same.choices[0].message.content == r.choices[0].message.content


def test_sixteen_concurrent_requests_equal_their_single_outputs(server, client):
    words = ["café", "naïve", "日本語", "emoji 🙂", "ascii", "façade", "中文", "∑ ≠"]
    jobs = [dict(prompt=w * (1 + i % 3), max_tokens=4 + i % 7, temperature=0 if i % 2 else 0.9, seed=i)
            for i, w in enumerate(words * 2)]  # 16 requests, mixed lengths, greedy and seeded sampling
    single = [client.completions.create(model=server.name, **j).choices[0].text for j in jobs[:6]]
    results = [None] * len(jobs)

    def call(i):
        results[i] = client.completions.create(model=server.name, **jobs[i]).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[:6] == single
    for i in range(6, len(jobs)):  # each equals the same request sent alone
        assert results[i] == client.completions.create(model=server.name, **jobs[i]).choices[0].text


def test_disconnect_mid_stream_frees_the_space(server, client):
    cancelled = metric(server, 'nanoseek_requests_finished_total{finish_reason="cancelled"}')
    body = {"model": server.name, "prompt": "café", "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: {") for line in got)
    deadline = time.time() + 20
    while time.time() < deadline and metric(server, "nanoseek_cache_slots_used") > 0:
        time.sleep(0.1)
    assert metric(server, "nanoseek_cache_slots_used") == 0
    assert metric(server, 'nanoseek_requests_finished_total{finish_reason="cancelled"}') == cancelled + 1
    r = client.completions.create(model=server.name, prompt="café", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens >= 1


BAD = [  # (endpoint, body or raw bytes, status, param)
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "hi " * 300, "max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 255}, 400, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, None),
    ("completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("completions", {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("completions", {}, 400, "prompt"),
    ("completions", b'{"prompt": "hi", ', 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999}, 400, "messages"),
    ("completions", b'{"prompt": "\\ud800abc", "model": "tiny-bpe"}', 400, "prompt"),  # a lone surrogate
    ("completions", {"prompt": ["ok", "abc\udfff"]}, 400, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]}, 400,
     "messages"),
    ("completions", {"prompt": "hi", "seed": 2**63, "n": 2}, 400, "seed"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "hi", "stream": False, "stream_options": {}}, 400, "stream_options"),
    ("completions", {"prompt": "hi", "\ud800": 1}, 400, None),  # a lone surrogate as a key
    ("completions", {"prompt": "x" * 200_000}, 400, "prompt"),  # refused before tokenizing (no tokens counted)
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_4xx_openai_errors(server, endpoint, body, status, param):
    url = f"{server.url}/v1/{endpoint}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:  # json.dumps escapes lone surrogates (as JSON.stringify)
        r = httpx.post(url, content=json.dumps({"model": server.name, **body}),
                       headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    named = param is None or param in err["message"] or "context length" in err["message"]  # as OpenAI words it
    assert named or param.startswith("messages.")  # pydantic's message for a message's field
    assert "None" not in err["message"] and "Overflow" not in err["message"]


def test_errors_name_what_is_wrong(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "missing required parameter: the request body" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="characters, more than 256 tokens") as e:
        client.completions.create(model=server.name, prompt="ab" * 100_000, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    two = client.completions.create(model=server.name, prompt="hi", seed=2**63 - 1, n=2, max_tokens=8)
    assert two.choices[0].text != two.choices[1].text  # choice 1 samples with seed 2^63: torch takes up to 2^64 - 1


def test_request_size_limit_413_and_health_meanwhile(server, client):
    big = {"model": server.name, "prompt": "café " * 2_000_000, "max_tokens": 1}  # 12 MB
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + "/v1/completions", json=big,
                                                                   timeout=120)))
    t.start()
    while t.is_alive():  # the server answers others while it handles the big one (a stall took 20+ s)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    t.join()
    assert result["r"].status_code == 413, result["r"].text
    err = result["r"].json()["error"]
    assert err["code"] == "request_too_large" and "--max-request-bytes" in err["message"] and err["param"] is None
    with pytest.raises(openai.APIStatusError, match="1,048,576 bytes") as e:  # the openai client reads it
        client.completions.create(model=server.name, prompt="a" * 2**20, max_tokens=1)
    assert e.value.status_code == 413

    def chunks():  # no Content-Length: chunked transfer encoding, 2 MiB
        yield b'{"model": "' + server.name.encode() + b'", "prompt": "'
        for _ in range(32):
            yield b"a" * 2**16
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=server.name, prompt="café", max_tokens=2).usage.completion_tokens >= 1


def test_disconnect_cancels_a_plain_request_at_once(server):
    finished = {k: metric(server, f'nanoseek_requests_finished_total{{finish_reason="{k}"}}')
                for k in ("cancelled", "length", "stop")}
    body = json.dumps({"model": server.name, "prompt": "café", "max_tokens": 240, "n": 16, "temperature": 1,
                       "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while not metric(server, "nanoseek_requests_running"):
            time.sleep(0.01)  # until it runs
    deadline = time.time() + 20
    while time.time() < deadline and metric(server, "nanoseek_cache_slots_used") > 0:
        time.sleep(0.05)
    assert metric(server, "nanoseek_cache_slots_used") == 0
    now = {k: metric(server, f'nanoseek_requests_finished_total{{finish_reason="{k}"}}') for k in finished}
    assert sum(now.values()) - sum(finished.values()) == 16
    assert now["cancelled"] > finished["cancelled"]  # the ones still running when the client left: not to length


def test_other_errors_and_server_keeps_serving(server, client):
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model=server.name, prompt="hi " * 300, max_tokens=4)
    assert client.completions.create(model=server.name, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    assert "Traceback" not in server.log.read_text()


def test_stream_events_and_metrics(server):
    body = {"model": server.name, "prompt": "ab", "max_tokens": 6, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["object"] == "text_completion" for c in chunks)
    text = httpx.get(server.url + "/metrics").text
    for name in ("nanoseek_requests_running", "nanoseek_requests_waiting", "nanoseek_cache_slots_used",
                 "nanoseek_cache_tokens_used", "nanoseek_generation_tokens_total",
                 "nanoseek_time_to_first_token_seconds_count", "nanoseek_time_per_output_token_seconds_count"):
        assert re.search(rf"^{name} \d", text, re.M), name
    assert metric(server, "nanoseek_time_to_first_token_seconds_count") >= 5
    gauges = re.findall(r"^# TYPE (\S+) gauge$", text, re.M)
    assert {"nanoseek_cache_slots", "nanoseek_cache_bytes"} <= set(gauges)
    assert not [g for g in gauges if g.endswith("_total")] and "nanoseek_cache_bytes_total" not in text
    assert metric(server, "nanoseek_generation_tokens_total") > 50


def test_speculative_server_greedy_equals_plain_and_exports_acceptance(server, client, tmp_path):
    spec = start_server(tmp_path, "--speculative", like=server)
    try:
        for prompt in ("café 日本", "naïve 🙂"):
            body = {"model": server.name, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            want = client.completions.create(**body).choices[0].text
            assert httpx.post(spec.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == want
        text = httpx.get(spec.url + "/metrics").text
        for depth in (1, 2):
            assert metric(spec, f'nanoseek_spec_draft_tokens_proposed_total{{depth="{depth}"}}') > 0
            assert re.search(rf'^nanoseek_spec_draft_tokens_accepted_total{{depth="{depth}"}} \d', text, re.M)
    finally:
        assert stop_server(spec) == 0


def test_sigterm_finishes_in_flight_requests_and_exits(server):
    body = {"model": server.name, "prompt": "café", "max_tokens": 60, "temperature": 0}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + "/v1/completions", json=body,
                                                                   timeout=60)))
    t.start()
    time.sleep(0.3)
    assert stop_server(server) == 0
    t.join(timeout=30)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] >= 1
    assert "server stopped" in server.log.read_text()


def test_flags_from_the_config_with_defaults_and_the_old_name_refused(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--max-model-len" in out and "(default: 64)" in out and "(default: 127.0.0.1)" in out
    assert main(["serve", "--model", "m", "--max-len", "9"]) == 2
    assert "--max-len is now --max-model-len" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--max-batch", "0"]) == 2
    assert "--max-batch 0: must be >= 1" in capsys.readouterr().err
