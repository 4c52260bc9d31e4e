"""The chat page at GET / in a real browser: Debian's headless Chromium, driven by Playwright, against the real
server with an API key."""

import os
import re
import shutil
import sys

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect

from test_serve import KEY, Server

CHROMIUM = shutil.which("chromium")
MAX_SEQ_LEN = 512
SYSTEM = "Answer briefly."

pytestmark = [pytest.mark.cpu_only("the server runs in a subprocess on the CPU")]
if CHROMIUM is None:  # .ci/run installs it; elsewhere say what is missing rather than fail
    pytestmark.append(pytest.mark.skipif(not os.environ.get("CI"),
                                         reason="needs Debian's chromium (apt-get install chromium)"))

# Each text an answer's box was given, in order (each a new text node: kept even when several come in one task):
# how the test sees an answer written piece by piece.
RECORD_ANSWERS = """() => {
  window.shown = [];
  new MutationObserver((records) => {
    for (const record of records) {
      if (!record.target.classList || !record.target.classList.contains("content")) continue;
      for (const node of record.addedNodes) if (node.nodeType === Node.TEXT_NODE) window.shown.push(node.data);
    }
  }).observe(document.getElementById("conversation"), {subtree: true, childList: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_dir, tokenizer_path):
    server = Server([sys.executable], tiny_dir / "gqa-mp1", tokenizer_path, "--max_seq_len", MAX_SEQ_LEN,
                    "--api-key", KEY, api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    # (the page's Content-Security-Policy forbids eval: the test waits through locators, not JavaScript strings)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(server.url + "/")
        yield page
        browser.close()


def answers(page) -> list:
    return [box.text_content() for box in page.locator('.message[data-role="assistant"] .content').all()]


def send(page, text: str, done: int) -> None:
    """Type a message, press Enter, wait for the page's `done`-th finished answer."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    try:
        page.locator('.message[data-role="assistant"][data-state="done"]').nth(done - 1).wait_for()
    except PlaywrightTimeout:
        states = [box.get_attribute("data-state") for box in page.locator('.message[data-role="assistant"]').all()]
        raise AssertionError(f"no answer to {text!r}: answers {states}, status {page.text_content('#status')!r}")


def test_two_messages_stream_their_answers_and_keep_the_conversation(page, server, build):
    reference = build("gqa", max_seq_len=MAX_SEQ_LEN)
    assert "API key" in page.text_content("#status")  # the page asked for the key it lacks
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model")).to_have_text("gqa-mp1")
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.evaluate(RECORD_ANSWERS)

    dialog = [{"role": "system", "content": SYSTEM}]
    for i, message in enumerate(["hello", "the capital of france"], start=1):
        send(page, message, done=i)
        dialog.append({"role": "user", "content": message})
        dialog.append(reference.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"])
        assert answers(page)[-1] == dialog[-1]["content"]  # the whole conversation was sent, system prompt first
        shown = page.evaluate("window.shown.splice(0)")
        assert len(shown) > 2 and shown[-1] == dialog[-1]["content"]  # written piece by piece
        assert all(dialog[-1]["content"].startswith(text) for text in shown)

    roles = [box.get_attribute("data-role") for box in page.locator(".message").all()]
    texts = [box.text_content() for box in page.locator(".message .content").all()]
    assert roles == ["user", "assistant"] * 2
    assert texts == [m["content"] for m in dialog[1:]]


def test_stop_ends_the_answer_and_frees_its_row(page, server):
    page.fill("#max-tokens", "")  # the rest of the context: hundreds of tokens
    page.fill("#input", "tell me a story")
    page.click("#send")
    answer = page.locator('.message[data-role="assistant"]').last
    expect(answer.locator(".content")).to_have_text(re.compile(".{4}"))  # it is being written
    page.click("#stop")
    assert answer.get_attribute("data-state") == "stopped"
    assert "[stopped]" in answer.text_content()
    assert server.idle(timeout=5)["running"] == 0  # the server dropped the answer when the page stopped reading
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_a_wrong_key_is_reported_and_the_message_kept(page, server):
    page.fill("#api-key", "wrong")
    page.fill("#input", "hello again")
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("API key")
    assert page.input_value("#input") == "hello again"  # taken back, to send again
    assert page.locator(".message").count() == 6  # the failed exchange is not in the conversation
    page.fill("#api-key", KEY)
    page.fill("#max-tokens", "8")
    send(page, "hello again", done=3)  # (the stopped answer is not "done")
    assert httpx.get(server.url + "/health", headers=server.headers).json()["running"] == 0
