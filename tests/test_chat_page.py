"""The chat page at `/` in a real headless browser (Debian's chromium driven by playwright): type a message, see
the reply stream in, equal to the same greedy chat completion asked through the API; a model trained on a built-in
task the way the demo trains it answers its raw prompts in the page as through /v1/completions, and a conversation
longer than its context loses its oldest turns (or, a message alone too long, shows the server's error)."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from serve_fixture import start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("the chat-page test needs Debian's chromium: `apt-get install -y chromium` (as root)",
                allow_module_level=True)
from playwright import sync_api  # noqa: E402  (after the skip: without chromium there is nothing to drive)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = start_server(tmp_path_factory.mktemp("page"))
    yield served
    stop_server(served)


@contextmanager
def chat_page(server):
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_have_text(server.name)
            page.fill("#temperature", "0")
            yield page
        finally:
            browser.close()


def say(page, text: str) -> str:
    """Type ``text``, wait for the reply to end: -> the last reply's (or error's) text."""
    page.fill("#input", text)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator(".msg.user").last).to_have_text(text)
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    return page.locator(".msg.assistant, .msg.error").last.text_content()


@pytest.fixture(scope="module")
def countdown_server(tmp_path_factory):
    """A tiny Countdown model with a 64-token context, SFT-trained as the demo's stage trains it (fewer steps)."""
    from nanoseek.recipes.demo import DemoConfig, _sft
    from nanoseek.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("countdown")
    checkpoint = _sft(DemoConfig(preset="tiny", sft_batch=16, device="cpu"), tmp / "demo-sft", 40, None, False)
    served = start_server(tmp, like=SimpleNamespace(directory=tmp / "demo-sft", model=None,  # the run directory
                                                    tokenizer=Tokenizer.load(checkpoint["checkpoint"])))
    yield served
    stop_server(served)


def test_task_model_answers_raw_prompts_in_the_page_as_through_completions(countdown_server):
    from nanoseek.recipes.runner import held_out

    server = countdown_server
    prompts = [r.prompt for r in held_out("countdown", 3)]
    template = server.tokenizer.template()  # the training format: a user turn is the raw prompt
    assert template.render([{"role": "user", "content": prompts[0]}]) == prompts[0]
    with chat_page(server) as page:
        page.fill("#max_tokens", "20")
        for prompt in prompts:
            page.click("#clear")
            want = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": server.name, "prompt": prompt, "max_tokens": 20, "temperature": 0}).json()
            assert say(page, prompt) == want["choices"][0]["text"] and want["choices"][0]["finish_reason"] == "stop"


def test_conversation_past_the_context_drops_old_turns_or_shows_the_error(countdown_server):
    from nanoseek.recipes.runner import held_out

    prompts = [r.prompt for r in held_out("countdown", 8)]
    with chat_page(countdown_server) as page:
        for prompt in prompts:  # ~13 tokens a turn: the 64-token context holds four
            say(page, prompt)
            assert page.locator(".msg.error").count() == 0
        assert "earlier messages left out to fit the context" in page.locator("#status").text_content()
        assert page.locator(".msg.assistant").count() == len(prompts)
        reply = say(page, "1," * 40 + ":9=")  # alone more than the context
        assert reply.startswith("error: ") and "context" in reply
        assert page.locator(".msg.error").count() == 1
        assert page.locator("#status").text_content() == "the last message failed; it is not part of the conversation"
        assert not say(page, prompts[0]).startswith("error") and page.locator(".msg.error").count() == 1  # goes on


def test_typed_message_streams_a_reply(server):
    want = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": server.name, "messages": [{"role": "user", "content": "Grüße, café?"}], "max_tokens": 40,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert want.strip()
    with chat_page(server) as page:
        page.fill("#max_tokens", "40")
        page.fill("#input", "Grüße, café?")
        page.keyboard.press("Enter")
        sync_api.expect(page.locator(".msg.user")).to_have_text("Grüße, café?")
        reply = page.locator(".msg.assistant")
        sync_api.expect(page.locator("#send")).to_be_enabled(timeout=60_000)  # the stream has ended
        assert reply.text_content() == want
        chunks = int(page.locator("#status").text_content().split()[0])
        assert chunks > 1  # it arrived in pieces, not at once
