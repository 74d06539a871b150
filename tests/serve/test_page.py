"""The chat page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): it shows the
model and runtime, streams a reply into the page as it is generated, keeps the history for the next turn,
and its Stop button ends a reply mid-way. Skipped, with the reason, where no browser is installed. ~10 s."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.serve.conftest import start

CHROMIUM = os.environ.get("KITITANS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no Chromium (apt-get install chromium, or set KITITANS_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


def test_chat_page_streams_keeps_history_and_stops(browser, debug_run):
    s = start(debug_run)
    step = s.engine.seqs.step
    s.engine.seqs.step = lambda tokens: (__import__("time").sleep(0.01), step(tokens))[1]  # watchable pace
    try:
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(s.url + "/")
        assert debug_run.name in page.locator("#model").inner_text()
        assert "torch" in page.locator("#model").inner_text()
        page.fill("#max_tokens", "40")
        page.fill("#seed", "1")
        page.fill("#input", "What does a cow say?")
        page.press("#input", "Enter")
        reply = page.locator(".msg.assistant").first
        # streamed: text appears while the Stop button is still live, before the reply has ended
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0 "
                               "&& !document.querySelector('#stop').disabled", timeout=30000)  # fmt: skip
        page.wait_for_function("document.querySelector('#stop').disabled", timeout=60000)
        first = reply.inner_text()
        assert first.strip() and "tokens" in reply.locator(".meta").inner_text()
        # second turn: the history goes with it (two user messages in the request)
        bodies = []
        page.on("request", lambda r: bodies.append(r.post_data) if r.method == "POST" else None)
        page.fill("#max_tokens", "400")
        page.fill("#input", "And a dog?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                               "document.querySelectorAll('.msg.assistant')[1].textContent.length > 0", timeout=30000)  # fmt: skip
        page.click("#stop")  # mid-way
        page.wait_for_function("document.querySelector('#stop').disabled", timeout=30000)
        assert "stopped" in page.locator(".msg.assistant").nth(1).locator(".meta").inner_text()
        assert bodies and '"What does a cow say?"' in bodies[0] and '"And a dog?"' in bodies[0]
        assert all(u.startswith(s.url) for u in requests)  # nothing from anywhere else (no CDN)
        page.close()
    finally:
        s.close()
