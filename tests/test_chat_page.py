"""The conversation page (/chat) in a real headless Chromium with a fake microphone fed from a
speech recording: the page captures it with an AudioWorklet at 24 kHz, talks to WS /api/chat in PCM
mode, plays the agent's audio and shows its text; a real worker on the tiny model answers.

Debian's Chromium (scripts/setup.sh installs it) driven by playwright, which cannot download its
own browsers here: `executable_path` points at the system one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
from fixtures import SPEECH_20S, WorkerProcess, wait_until

from worker.control import query_gpu_status

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
def test_the_page_holds_a_conversation_with_a_fake_microphone(
    start_worker: Callable[..., WorkerProcess], start_web: Callable[..., Any]
) -> None:
    from playwright.sync_api import sync_playwright

    worker = start_worker("gpu0")
    server = start_web()
    args = [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={SPEECH_20S}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/chat")
            page.wait_for_function("document.getElementById('voice').options.length === 18")
            page.select_option("#voice", "NATM1.pt")
            page.click("#call")
            page.wait_for_function("window.chatState.handshake", timeout=60_000)
            # Audio and text come back only once the microphone's frames reach the worker.
            page.wait_for_function("window.chatState.audioFrames >= 25", timeout=60_000)
            page.wait_for_function("window.chatState.text.length > 0", timeout=30_000)
            assert page.text_content("#transcript")
            page.click("#hangup")
            page.wait_for_function("window.chatState.closed", timeout=10_000)
            state = page.evaluate("window.chatState")
            assert state["closeCode"] == 1000 and not state["errors"], state
            assert not errors, errors
        finally:
            browser.close()

    def live_sessions() -> int:
        from personaplex.settings import Settings
        from worker import create_celery_app

        app = create_celery_app(Settings.from_env({"REDIS_URL": worker.env["REDIS_URL"]}))
        return int(query_gpu_status(app, [worker.hostname], timeout=5.0)[worker.hostname]["live_sessions"])

    wait_until(lambda: live_sessions() == 0, 5, what="the page's conversation to leave the loop")
