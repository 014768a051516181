"""The chat page at `/` in a real headless browser (Debian's chromium driven by playwright): type a message, see
the reply stream in, equal to the same greedy chat completion asked through the API."""

import os
import shutil
import tempfile

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


def test_typed_message_streams_a_reply(server):
    want = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": server.name, "messages": [{"role": "user", "content": "Grüße, café?"}], "max_tokens": 40,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert want.strip()
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_have_text(server.name)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            page.fill("#input", "Grüße, café?")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator(".msg.user")).to_have_text("Grüße, café?")
            reply = page.locator(".msg.assistant")
            sync_api.expect(page.locator("#send")).to_be_enabled(timeout=60_000)  # the stream has ended
            assert reply.text_content() == want
            chunks = int(page.locator("#status").text_content().split()[0])
            assert chunks > 1  # it arrived in pieces, not at once
        finally:
            browser.close()
