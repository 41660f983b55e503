"""The web console (/) in a real headless Chromium, driven over the DevTools protocol by playwright
(Debian's Chromium: playwright cannot download its own browsers here), against a real server with an
API key and a real worker on the tiny model.

One stack and one browser serve the whole module (a 2-core CI machine starts a worker once); each
test gets a fresh browser context, so a fresh tab whose sessionStorage holds no key.
"""

from __future__ import annotations

import json
import shutil
import signal
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from fixtures import SPEECH_20S, SPEECH_40S, RedisServer, WorkerProcess, tiny_service_env, wait_until
from test_chat_page import hold_conversation

from personaplex.audio import encode_wav, load
from personaplex.devstack import CHROMIUM, chromium_args

pytestmark = pytest.mark.slow

KEY = "console-test-key"
"""The server's one key (PERSONAPLEX_API_KEY): an admin key, so offload is allowed."""
WORKER = "gpu0@test"
MARKERS = {"PAD", "EPAD", "BOS", "EOS"}


@dataclass
class Stack:
    url: str
    worker: WorkerProcess
    clips: Path
    config: dict[str, Any]
    """The web app's settings: another server on the same Redis and data starts from them."""

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def wait_for_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            job = self.api("GET", f"/api/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        return wait_until(final, timeout, interval=0.2, what=f"job {job_id}")  # type: ignore[return-value]


def clip(source: Path, start_s: float, seconds: float) -> bytes:
    samples = load(source)
    return encode_wav(
        np.ascontiguousarray(samples[int(start_s * 24000) : int((start_s + seconds) * 24000)]),
        24000,
        subtype="PCM_16",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Stack]:
    """Redis, a worker on the tiny model and the web server with an API key, private to this module."""
    from web.app import create_app
    from web.server_thread import ServerThread

    root = tmp_path_factory.mktemp("console")
    redis_server = RedisServer(root / "redis")
    redis_server.start()
    env = tiny_service_env(redis_server.url, tiny_checkpoint, root / "data")
    worker = WorkerProcess("gpu0", env, root / "logs").start()
    clips = root / "clips"
    clips.mkdir()
    # Speech from the first second on: the recording is silent before 3 s.
    (clips / "speech.wav").write_bytes(clip(SPEECH_40S, 2.5, 6.0))
    for index, name in enumerate(("a.wav", "b.wav", "c.wav")):
        (clips / name).write_bytes(clip(SPEECH_40S, 3.0 + index, 1.5))
    (clips / "notes.wav").write_text("These are my notes, not a recording.\n")
    (clips / "empty.wav").write_bytes(b"")
    config = {"redis_url": redis_server.url, "data_dir": root / "data", "api_key": KEY}
    try:
        with ServerThread(create_app(config, environ={})) as server:
            worker.wait_ready()
            yield Stack(server.url, worker, clips, config)
    finally:
        worker.stop()
        redis_server.stop()
        print(f"----- log of worker {worker.hostname} -----\n{worker.log()}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    args = chromium_args(SPEECH_20S)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own context: no key in its sessionStorage); no uncaught error may happen in it."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, errors


def open_console(page: Any, stack: Stack, view: str = "", key: str | None = KEY) -> None:
    page.goto(f"{stack.url}/{view}")
    page.wait_for_function("window.consoleState && window.consoleState.ready")
    if key is not None:
        page.fill("#key-input", key)
        page.click("#key-save")


def lane_heights(page: Any, kind: str) -> list[int]:
    """Per column of the lane's canvas: how many pixels the waveform covers (its colour, not grey)."""
    return page.evaluate(
        """(kind) => {
          const canvas = document.querySelector(`#result-timeline canvas.wave.${kind}`);
          const { width, height } = canvas;
          const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
          const heights = new Array(width).fill(0);
          for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) {
            const i = 4 * (y * width + x);
            const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
            if (Math.max(r, g, b) - Math.min(r, g, b) > 60) heights[x] += 1;
          }
          return heights;
        }""",
        kind,
    )


def submitted_batch(page: Any) -> str:
    """The id of the batch this tab just submitted, once every job of it is final."""
    page.wait_for_function("window.consoleState.submitted.at(-1)?.kind === 'batch'", timeout=30_000)
    batch_id = page.evaluate("window.consoleState.submitted.at(-1).id")
    page.wait_for_function(f"window.consoleState.batches['{batch_id}']?.finished", timeout=120_000)
    return batch_id


def status_text(page: Any, selector: str, contains: str, timeout: float = 15_000) -> str:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.textContent || '').includes(text)",
        arg=[selector, contains],
        timeout=timeout,
    )
    return page.text_content(selector)


# -- the key ----------------------------------------------------------------------------------------


def test_without_the_key_the_console_says_401_plainly_and_keeps_the_key_for_the_tab(
    stack: Stack, page: Any
) -> None:
    open_console(page, stack, "#jobs", key=None)
    shown = status_text(page, "#jobs-message", "401")
    assert shown.startswith("401: the API key is missing or wrong. Enter it above."), shown
    assert "wanted" in page.get_attribute("#key-form", "class")

    page.fill("#key-input", "not-the-key")
    page.click("#key-save")
    page.wait_for_function("window.consoleState.problems.filter(p => p.status === 401).length >= 2")
    assert page.text_content("#jobs-message").startswith("401: ")

    page.fill("#key-input", KEY)
    page.click("#key-save")
    status_text(page, "#jobs-message", "jobs")
    assert "wanted" not in page.get_attribute("#key-form", "class")
    assert page.evaluate("sessionStorage.getItem('personaplex.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0, "the key must not outlive the tab"

    page.reload()  # the same tab keeps its key...
    page.wait_for_function("window.consoleState.ready")
    status_text(page, "#jobs-message", "jobs")
    assert "Key in use" in page.text_content("#key-state")
    other = page.context.new_page()  # ...another tab does not have it
    other.goto(f"{stack.url}/#jobs")
    status_text(other, "#jobs-message", "401")
    other.close()


# -- one job ----------------------------------------------------------------------------------------


def test_a_job_shows_its_bar_reach_100_percent_then_waveforms_players_transcript_and_timings(
    stack: Stack, page: Any
) -> None:
    open_console(page, stack)
    # The form is complete on first paint, before any key: defaults from the server's own document.
    prompts = stack.api("GET", "/api/prompts").json()
    assert page.input_value("#submit-text_prompt") == prompts["default"]
    assert page.input_value("#submit-seed") == str(prompts["default_seed"])

    page.set_input_files("#submit-file", str(stack.clips / "speech.wav"))
    # Hold the worker so the page follows the job from queued through every phase to the end.
    stack.worker.process.send_signal(signal.SIGSTOP)
    try:
        page.click("#submit-go")
        page.wait_for_function("location.hash.startsWith('#job/')")
        job_id = page.evaluate("location.hash.split('/')[1]")
        page.wait_for_function(f"window.consoleState.jobs['{job_id}']?.live", timeout=10_000)
        assert page.evaluate(f"window.consoleState.jobs['{job_id}'].percent") == 0
    finally:
        stack.worker.process.send_signal(signal.SIGCONT)
    page.wait_for_function(f"window.consoleState.jobs['{job_id}'].percent === 100", timeout=120_000)
    assert page.get_attribute("#result-head progress", "value") == "100"
    job = page.evaluate(f"window.consoleState.jobs['{job_id}']")
    assert job["status"] == "succeeded"
    assert "progress" in job["events"] and job["events"][-1] == "succeeded", job["events"]
    assert {"prompt", "generate"} <= set(job["phases"]), job["phases"]

    page.wait_for_function("window.consoleState.result?.reply === 'drawn'", timeout=30_000)
    result = page.evaluate("window.consoleState.result")
    assert result["input"] == "drawn" and result["players"] == 2, result
    page.wait_for_function(
        "[...document.querySelectorAll('#result-players audio')].every(a => a.readyState >= 1 && a.duration > 5.9)"
    )
    kinds = page.eval_on_selector_all("#result-players audio", "list => list.map(a => a.dataset.kind)")
    assert kinds == ["input", "reply"]
    assert page.locator("#result-timeline canvas.wave").count() == 2
    # Drawn from the decoded audio on the shared axis: the input's first half second is silence (a
    # flat line), its speech fills the lane; the tiny model's reply is loud noise throughout.
    input_at = lane_heights(page, "input")
    reply_at = lane_heights(page, "reply")
    silent = int(0.4 * page.evaluate("window.consoleState.result.pxPerSecond"))
    assert max(input_at[:silent]) <= 2 and max(input_at) > 40, input_at
    assert min(reply_at) > 10, reply_at

    # The transcript: one label per frame that holds text, at its frame's time (80 ms a frame).
    text = stack.api("GET", f"/api/jobs/{job_id}/text").json()
    words = [
        (index, piece) for index, piece in enumerate(text["frames"]) if piece not in MARKERS and piece.strip()
    ]
    assert result["pieces"] == len(words) == page.locator("#result-timeline .piece").count()
    labels = page.eval_on_selector_all(
        "#result-timeline .piece", "list => list.map(p => [p.textContent, parseFloat(p.style.left)])"
    )
    for (index, piece), (shown, left) in zip(words, labels, strict=True):
        assert shown == piece and left == pytest.approx(index * 0.08 * result["pxPerSecond"], abs=0.5)
    assert not any(shown in MARKERS for shown, _ in labels)

    timings = page.text_content("#result-timings")
    for phase in ("queue wait", "prompt", "generate", "decode"):
        assert phase in timings
    assert result["timings"]["generate_s"] == text["timings"]["generate_s"] > 0

    # Another tab never saw the file: it draws the input the server kept, the same waveform.
    other = page.context.new_page()
    open_console(other, stack, f"#job/{job_id}")
    other.wait_for_function("window.consoleState.result?.reply === 'drawn'", timeout=30_000)
    assert other.evaluate("window.consoleState.result")["input"] == "drawn"
    assert lane_heights(other, "input") == input_at
    other.close()


# -- a batch ----------------------------------------------------------------------------------------


def test_a_batch_of_three_files_runs_with_a_per_file_seed_and_its_archive_downloads(
    stack: Stack, page: Any, tmp_path: Path
) -> None:
    open_console(page, stack)
    page.check("#submit-form input[value=batch]")
    page.set_input_files(
        "#submit-batch-files", [str(stack.clips / name) for name in ("a.wav", "b.wav", "c.wav")]
    )
    assert page.locator("#submit-batch-rows tr").count() == 3
    page.fill('#submit-batch-rows tr[data-path="b.wav"] input', "7")
    page.click("#submit-go")

    batch_id = submitted_batch(page)
    card = f"#batch-{batch_id}"
    status_text(page, f"{card} [data-status=succeeded]", "3 succeeded")
    assert page.locator(f"{card} progress").get_attribute("value") == "100"

    with page.expect_download() as download:
        page.click(f"{card} .batch-archive")
    assert download.value.suggested_filename == f"batch-{batch_id}.zip"
    saved = tmp_path / "batch.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        names = sorted(archive.namelist())
        manifest = json.loads(archive.read("_batch.json"))
    assert names == ["_batch.json", "a.json", "a.wav", "b.json", "b.wav", "c.json", "c.wav"]
    seeds = {
        entry["name"]: stack.api("GET", f"/api/jobs/{entry['job_id']}").json()["params"]["seed"]
        for entry in manifest["inputs"]
    }
    default_seed = stack.api("GET", "/api/prompts").json()["default_seed"]
    assert seeds == {"a.wav": default_seed, "b.wav": 7, "c.wav": default_seed}


def test_a_folder_a_zip_and_a_dropped_file_make_one_batch(stack: Stack, page: Any, tmp_path: Path) -> None:
    folder = tmp_path / "calls"
    for day in ("monday", "tuesday"):  # the same file name in two folders: two inputs
        (folder / day).mkdir(parents=True)
        shutil.copy(stack.clips / "a.wav", folder / day / "a.wav")
    (folder / ".DS_Store").write_bytes(b"junk")  # skipped, as the server skips it in a zip
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(stack.clips / "b.wav", "inside/b.wav")
    open_console(page, stack)
    page.check("#submit-form input[value=batch]")
    page.set_input_files("#submit-batch-folder", str(folder))
    page.set_input_files("#submit-batch-files", str(archive))
    # A drop: the zone's handler reads the event's DataTransfer, here one built in the page.
    page.evaluate(
        """async (bytes) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([new Uint8Array(bytes)], "c.wav", { type: "audio/wav" }));
          const zone = document.getElementById("submit-drop");
          zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        list((stack.clips / "c.wav").read_bytes()),
    )
    page.wait_for_function("document.querySelectorAll('#submit-batch-rows tr').length === 4")
    paths = page.eval_on_selector_all("#submit-batch-rows tr", "rows => rows.map(r => r.dataset.path)")
    assert sorted(paths) == ["c.wav", "calls/monday/a.wav", "calls/tuesday/a.wav", "more.zip"]
    page.click("#submit-go")
    batch_id = submitted_batch(page)
    batch = stack.api("GET", f"/api/batches/{batch_id}").json()
    assert batch["counts"]["succeeded"] == 4
    assert sorted(entry["name"] for entry in batch["jobs"]) == [
        "c.wav",
        "calls_monday_a.wav",
        "calls_tuesday_a.wav",
        "inside_b.wav",
    ]


# -- what the browser and the server refuse ---------------------------------------------------------


def test_the_browser_refuses_what_the_server_would_and_shows_the_servers_400_as_it_is(
    stack: Stack, page: Any
) -> None:
    open_console(page, stack)
    jobs_before = stack.api("GET", "/api/jobs").json()["count"]

    page.set_input_files("#submit-file", str(stack.clips / "empty.wav"))
    page.click("#submit-go")
    assert status_text(page, "#submit-message", "empty") == "The uploaded file is empty."

    page.set_input_files("#submit-file", str(stack.clips / "speech.wav"))
    page.fill("#submit-seed", "many")
    page.click("#submit-go")
    assert status_text(page, "#submit-message", "seed") == "seed must be an integer, got 'many'."
    assert page.get_attribute("#submit-seed", "aria-invalid") == "true"
    page.fill("#submit-seed", "1")
    page.click("#submit-params summary")  # the sampling fields are folded away at first
    page.fill("#submit-temp_text", "11")
    page.click("#submit-go")
    assert status_text(page, "#submit-message", "temp_text") == "temp_text must be at most 10.0, got '11'."
    page.fill("#submit-temp_text", "")  # blank: the server's default
    problems = page.evaluate("window.consoleState.problems")
    assert [p["status"] for p in problems] == [None, None, None]
    assert stack.api("GET", "/api/jobs").json()["count"] == jobs_before, "nothing may reach the server"

    # The server's own message for what only it can judge: a text file named .wav is not audio.
    expected = stack.api(
        "POST", "/api/jobs", files={"file": ("notes.wav", (stack.clips / "notes.wav").read_bytes())}
    )
    assert expected.status_code == 400
    page.set_input_files("#submit-file", str(stack.clips / "notes.wav"))
    page.click("#submit-go")
    shown = status_text(page, "#submit-message", "400")
    assert shown == f"400: {expected.json()['error']}"
    assert page.evaluate("window.consoleState.problems.at(-1).status") == 400


def test_a_full_queue_is_said_plainly_with_when_to_retry(stack: Stack, page: Any) -> None:
    from web.app import create_app
    from web.server_thread import ServerThread

    # A second server on the same Redis whose queue holds one job; the held worker leaves it there.
    with ServerThread(create_app({**stack.config, "max_queue": 1}, environ={})) as small:
        full = Stack(small.url, stack.worker, stack.clips, stack.config)
        stack.worker.process.send_signal(signal.SIGSTOP)
        try:
            waiting = full.api(
                "POST", "/api/jobs", files={"file": ("a.wav", (stack.clips / "a.wav").read_bytes())}
            )
            assert waiting.status_code == 202
            refused = full.api(
                "POST", "/api/jobs", files={"file": ("a.wav", (stack.clips / "a.wav").read_bytes())}
            )
            assert refused.status_code == 429
            open_console(page, full)
            page.set_input_files("#submit-file", str(stack.clips / "speech.wav"))
            page.click("#submit-go")
            shown = status_text(page, "#submit-message", "429")
        finally:
            stack.worker.process.send_signal(signal.SIGCONT)
    retry_after = refused.headers["Retry-After"]
    assert shown == f"429: the queue is full; retry in {retry_after} s. ({refused.json()['error']})"
    assert stack.wait_for_job(waiting.json()["job_id"])["status"] == "succeeded"


# -- the fleet --------------------------------------------------------------------------------------


def test_the_fleet_lists_the_worker_loaded_refreshes_and_offloads_it(stack: Stack, page: Any) -> None:
    # The worker has the model loaded once it has run a job.
    accepted = stack.api("POST", "/api/jobs", files={"file": ("a.wav", (stack.clips / "a.wav").read_bytes())})
    assert stack.wait_for_job(accepted.json()["job_id"])["status"] == "succeeded"

    open_console(page, stack, "#fleet")
    row = f'#fleet-rows tr[data-worker="{WORKER}"]'
    page.wait_for_selector(f'{row}[data-loaded="true"]', timeout=15_000)
    assert "cpu" in page.text_content(f"{row} td:nth-child(2)")
    assert "offloads in" in page.text_content(f"{row} td.idle")
    refreshes = page.evaluate("window.consoleState.fleet.refreshes")
    page.wait_for_function(f"window.consoleState.fleet.refreshes > {refreshes}", timeout=10_000)

    page.click(f"{row} .worker-offload")
    page.wait_for_function("window.consoleState.offloads.length === 1", timeout=15_000)
    offload = page.evaluate("window.consoleState.offloads[0]")
    assert offload["status"] == "offloaded" and offload["worker"] == WORKER, offload
    assert f"{WORKER}: offloaded" in page.text_content("#fleet-message")
    page.wait_for_selector(f'{row}[data-loaded="false"]', timeout=15_000)
    assert page.text_content(f"{row} .badge") == "offloaded"


# -- conversation and voices ------------------------------------------------------------------------


def test_the_conversation_tab_talks_with_the_fake_microphone(stack: Stack, page: Any) -> None:
    open_console(page, stack, "#talk")
    page.wait_for_function("document.getElementById('voice')?.options.length >= 18", timeout=15_000)
    hold_conversation(page, "NATM1.pt")


def test_a_voice_added_in_the_voices_tab_is_offered_for_jobs(stack: Stack, page: Any) -> None:
    open_console(page, stack, "#voices")
    page.wait_for_function("document.querySelectorAll('#voices-list li').length >= 18", timeout=15_000)
    page.set_input_files("#voices-file", str(stack.clips / "speech.wav"))
    page.fill("#voices-name", "Console Test")
    page.check("#voices-consent")
    page.click("#voices-upload")
    page.wait_for_function("window.voicesState.ids.includes('custom-console-test')", timeout=30_000)
    page.click(".tabs [data-tab=submit]")
    page.wait_for_selector(
        "#submit-voice option[value='custom-console-test']", state="attached", timeout=10_000
    )
    page.click(".tabs [data-tab=voices]")  # mounted once: shown again, not a second copy
    assert page.locator("#voices-list").count() == 1
    stack.api("DELETE", "/api/voices/custom-console-test")
