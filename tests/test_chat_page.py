"""The conversation page (/chat) in a real headless Chromium with a fake microphone fed from a
speech recording: the page captures it with an AudioWorklet at 24 kHz, talks to WS /api/chat in PCM
mode, plays the agent's audio and shows its text; a real worker on the tiny model answers. The same
page uploads a custom voice through its form, holds a conversation in it, and deletes it.

Debian's Chromium (scripts/setup.sh installs it) driven by playwright, which cannot download its
own browsers here: `executable_path` points at the system one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import requests
from fixtures import SPEECH_20S, WorkerProcess, speaker_recording, wait_until

from personaplex.catalog import DEFAULT_PROMPT, DEFAULT_VOICE
from personaplex.custom_voices import CODES_FIELD_PREFIX
from personaplex.devstack import CHROMIUM, chromium_args
from personaplex.jobs import Keys
from worker.control import query_gpu_status

if TYPE_CHECKING:
    from playwright.sync_api import Page

CATALOG_VOICES = 18
VOICE_ID = "custom-page-voice"  # what the server makes of the name "Page voice"


@contextmanager
def chat_page(url: str) -> Iterator[tuple[Page, list[str]]]:
    """/chat in a fresh headless Chromium whose microphone plays SPEECH_20S (with consent to use
    it already given), and the uncaught errors of its scripts, which a test asserts empty."""
    from playwright.sync_api import sync_playwright

    args = chromium_args(SPEECH_20S)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/chat")
            yield page, errors
        finally:
            browser.close()


def hold_conversation(page: Page, voice_id: str) -> None:
    """Call in `voice_id`, wait for the agent's audio and words, hang up cleanly."""
    page.select_option("#voice", voice_id)
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


def wait_for_no_live_sessions(worker: WorkerProcess) -> None:
    from personaplex.settings import Settings
    from worker import create_celery_app

    app = create_celery_app(Settings.from_env({"REDIS_URL": worker.env["REDIS_URL"]}))

    def live_sessions() -> int:
        return int(query_gpu_status(app, [worker.hostname], timeout=5.0)[worker.hostname]["live_sessions"])

    wait_until(lambda: live_sessions() == 0, 5, what="the page's conversation to leave the loop")


def voice_options(page: Page) -> list[str]:
    return page.eval_on_selector("#voice", "select => [...select.options].map(option => option.value)")


@pytest.mark.slow
def test_the_page_holds_a_conversation_with_a_fake_microphone(
    start_worker: Callable[..., WorkerProcess], start_web: Callable[..., Any]
) -> None:
    worker = start_worker("gpu0")
    server = start_web()
    with chat_page(server.url) as (page, errors):
        # start_web flushes Redis, so the catalog is the whole list.
        page.wait_for_function(f"document.getElementById('voice').options.length === {CATALOG_VOICES}")
        page.wait_for_function("document.getElementById('prompt').value.length > 0")
        assert page.input_value("#prompt") == DEFAULT_PROMPT and page.input_value("#voice") == DEFAULT_VOICE
        hold_conversation(page, "NATM1.pt")
        assert not errors, errors
    wait_for_no_live_sessions(worker)


@pytest.mark.slow
def test_a_voice_uploaded_on_the_page_is_listed_talked_in_and_deleted(
    start_worker: Callable[..., WorkerProcess],
    start_web: Callable[..., Any],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    worker = start_worker("gpu0")
    server = start_web()
    voice_wav = tmp_path / "speaker.wav"
    voice_wav.write_bytes(speaker_recording())
    short_wav = tmp_path / "short.wav"
    short_wav.write_bytes(speaker_recording(0.5))
    not_audio = b"These are my notes, not a recording.\n" * 20

    with chat_page(server.url) as (page, errors):
        posts: list[str] = []
        page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
        page.wait_for_function(f"window.voicesState.ids.length === {CATALOG_VOICES}")
        assert page.locator("#voices-list .voices-badge").count() == 0
        assert page.locator("#voices-list .voices-delete").count() == 0

        # What the browser can tell costs no upload: a missing file, and a recording it decoded
        # and measured too short.
        page.click("#voices-upload")
        assert page.evaluate("window.voicesState.message").startswith("Choose a recording")
        page.set_input_files("#voices-file", short_wav)
        page.fill("#voices-name", "Page voice")
        page.click("#voices-upload")
        assert page.evaluate("window.voicesState.message").startswith("Tick the consent box")
        page.check("#voices-consent")
        page.click("#voices-upload")
        page.wait_for_function("window.voicesState.message.includes('too short')")
        state = page.evaluate("window.voicesState")
        assert state["error"] and state["measured"] == pytest.approx(0.5, abs=0.01), state
        assert not posts, posts

        page.set_input_files("#voices-file", voice_wav)
        page.click("#voices-upload")
        page.wait_for_function(f"window.voicesState.ids.includes('{VOICE_ID}')", timeout=30_000)
        state = page.evaluate("window.voicesState")
        assert state["message"] == f"Added the voice Page voice as {VOICE_ID} (3.5 s).", state
        assert state["measured"] == pytest.approx(3.5, abs=0.01) and len(posts) == 1
        item = page.locator(f'#voices-list li[data-voice-id="{VOICE_ID}"]')
        assert item.locator(".voices-badge").text_content() == "custom"
        assert "Page voice" in item.text_content() and "3.5 s, added" in item.text_content()
        assert page.locator("#voices-list .voices-delete").count() == 1  # catalog voices stay

        # The conversation heard "voices-changed" and offers the voice; the worker conditions on
        # it, which leaves the voice's Mimi codes stored beside its recording.
        page.wait_for_function(
            f"[...document.getElementById('voice').options].some(o => o.value === '{VOICE_ID}')"
        )
        hold_conversation(page, VOICE_ID)
        stored = redis_client.hkeys(Keys.voice(VOICE_ID))
        assert any(key.startswith(CODES_FIELD_PREFIX.encode()) for key in stored), stored

        # Undecodable here, so left to the server, whose message the page shows as it is.
        page.set_input_files(
            "#voices-file", {"name": "notes.wav", "mimeType": "audio/wav", "buffer": not_audio}
        )
        page.fill("#voices-name", "Notes")
        page.check("#voices-consent")  # the form was reset by the upload
        page.click("#voices-upload")
        page.wait_for_function("window.voicesState.message.startsWith('400: ')", timeout=30_000)
        answer = requests.post(
            server.url + "/api/voices",
            files={"file": ("notes.wav", not_audio)},
            data={"name": "Notes", "consent": "true"},
            timeout=30,
        )
        assert answer.status_code == 400 and answer.json()["field"] == "file", answer.text
        state = page.evaluate("window.voicesState")
        assert state["message"] == "400: " + answer.json()["error"] and state["measured"] is None, state

        page.once("dialog", lambda dialog: dialog.accept())
        page.click(f"#voices-delete-{VOICE_ID}")
        page.wait_for_function(f"!window.voicesState.ids.includes('{VOICE_ID}')")
        page.wait_for_function(f"document.getElementById('voice').options.length === {CATALOG_VOICES}")
        assert VOICE_ID not in voice_options(page) and page.locator(f"#voices-delete-{VOICE_ID}").count() == 0
        assert not redis_client.exists(Keys.voice(VOICE_ID))
        assert not errors, errors
    wait_for_no_live_sessions(worker)


@pytest.mark.slow
def test_the_key_entered_on_the_page_loads_both_lists_and_stays_for_the_tab(
    start_web: Callable[..., Any],
) -> None:
    server = start_web(api_key="page-secret")
    with chat_page(server.url) as (page, errors):
        page.wait_for_function("document.getElementById('status').textContent.includes('401')")
        page.wait_for_function("window.voicesState.message.includes('401')")
        assert page.input_value("#prompt") == "" and voice_options(page) == []
        page.fill("#key", "page-secret")
        page.press("#key", "Tab")  # a change event: the lists are read again with the key
        page.wait_for_function(f"window.voicesState.ids.length === {CATALOG_VOICES}")
        page.wait_for_function(f"document.getElementById('voice').options.length === {CATALOG_VOICES}")
        page.wait_for_function("document.getElementById('prompt').value.length > 0")
        assert page.input_value("#prompt") == DEFAULT_PROMPT
        assert page.text_content("#status") == "Not connected." and page.text_content("#voices-message") == ""
        page.reload()
        assert page.input_value("#key") == "page-secret"
        page.wait_for_function(f"window.voicesState.ids.length === {CATALOG_VOICES}")
        assert not errors, errors
