"""Retake the web console's screenshots (docs/console-*.png, shown in the README's "Web console").

    .venv/bin/python scripts/screenshots.py [--out docs] [--width 1000] [--workdir DIR]

Starts a private stack as the demo does (personaplex.devstack: a redis-server, a Celery worker on the
tiny random model, `python -m web`), drives the system Chromium through playwright as
tests/test_console_page.py does (the same launch arguments, the fake microphone fed from a test
recording), fills the console with a job, a batch, a call and a custom voice, and writes one PNG per
view. Each is optimised: pngquant when it is installed (256 colours), otherwise recompressed
losslessly. The tiny model's weights are random, so its replies are noise and its words gibberish.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from personaplex.devstack import CHROMIUM, chromium_args, local_service  # noqa: E402 - after the path

RECORDINGS = REPO_ROOT / "tests" / "data" / "recordings"
LONG_SECONDS = 160
"""The long job's input: long enough that the tiny model is still at it after two screenshots."""
MAX_HEIGHT = 1100
"""Tallest screenshot, CSS px: a view longer than this is cut at the bottom."""


def write_clips(folder: Path) -> dict[str, Path]:
    """Real speech cut from the test recordings (the 40 s one speaks from 3 s to 8 s), and a long
    "interview" (the recording end to end) that keeps the worker busy while the views are taken."""
    import numpy as np

    from personaplex.audio import encode_wav, load

    folder.mkdir(parents=True, exist_ok=True)
    speech = load(RECORDINGS / "input_assistant.wav")
    cuts = {
        "customer-call.wav": speech[int(2.5 * 24000) : int(8.5 * 24000)],
        "question-1.wav": speech[3 * 24000 : 5 * 24000],
        "question-2.wav": speech[int(4.5 * 24000) : int(6.5 * 24000)],
        "question-3.wav": speech[6 * 24000 : 8 * 24000],
        "interview.wav": np.resize(speech, LONG_SECONDS * 24000),
        "follow-up.wav": speech[3 * 24000 : 7 * 24000],
    }
    paths = {}
    for name, samples in cuts.items():
        paths[name] = folder / name
        paths[name].write_bytes(encode_wav(np.ascontiguousarray(samples), 24000, subtype="PCM_16"))
    return paths


# -- the browser -----------------------------------------------------------------------------------


@contextmanager
def browser_page(width: int) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    args = chromium_args(RECORDINGS / "input_service.wav")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            context = chromium.new_context(viewport={"width": width, "height": 800}, device_scale_factor=1)
            yield context.new_page()
        finally:
            chromium.close()


def shoot(page, out: Path, view: str) -> Path:
    """docs/console-<view>.png of the whole page, at most MAX_HEIGHT tall, optimised."""
    page.mouse.move(0, 0)  # no hover effect in the picture
    height = min(MAX_HEIGHT, page.evaluate("document.documentElement.scrollHeight"))
    width = page.viewport_size["width"]
    path = out / f"console-{view}.png"
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": width, "height": height}, full_page=True)
    optimise(path)
    print(
        f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}: {path.stat().st_size // 1024} kB"
    )
    return path


def submit(url: str, path: Path) -> str:
    """A job sent past the page (as another client would): its id."""
    with path.open("rb") as audio:
        answer = requests.post(f"{url}/api/jobs", files={"file": (path.name, audio)}, timeout=30)
    answer.raise_for_status()
    return answer.json()["job_id"]


def take_all(page, url: str, out: Path, clips: dict[str, Path]) -> None:
    page.goto(url + "/")
    page.wait_for_function("window.consoleState && window.consoleState.ready")

    # Submit: a batch of three, one with its own seed, before it is sent.
    page.check("#submit-form input[value=batch]")
    batch = [str(clips[name]) for name in ("question-1.wav", "question-2.wav", "question-3.wav")]
    page.set_input_files("#submit-batch-files", batch)
    page.fill('#submit-batch-rows tr[data-path="question-2.wav"] input', "7")
    page.select_option('#submit-batch-rows tr[data-path="question-3.wav"] select', "NATM1.pt")
    shoot(page, out, "submit")
    page.click("#submit-go")
    page.wait_for_function(
        "Object.values(window.consoleState.batches).some(b => b.finished)", timeout=120_000
    )

    # One job: its result view, with waveforms, players, transcript and timings.
    page.goto(url + "/#submit")
    page.check("#submit-form input[value=job]")
    page.set_input_files("#submit-file", str(clips["customer-call.wav"]))
    page.click("#submit-go")
    page.wait_for_function("window.consoleState.result?.reply === 'drawn'", timeout=120_000)
    page.wait_for_function(
        "[...document.querySelectorAll('#result-players audio')].every(a => a.readyState >= 1)"
    )
    shoot(page, out, "result")

    # Jobs and Fleet while a long job runs; a second one is cancelled while it waits behind it.
    long_job = submit(url, clips["interview.wav"])
    cancelled = submit(url, clips["follow-up.wav"])
    requests.delete(f"{url}/api/jobs/{cancelled}", timeout=10)
    page.click(".tabs [data-tab=jobs]")
    running = f"window.consoleState.jobs['{long_job}']"
    page.wait_for_function(f"{running}?.phase === 'generate' && {running}.percent > 40", timeout=120_000)
    shoot(page, out, "jobs")
    page.click(".tabs [data-tab=fleet]")
    page.wait_for_selector(f"#fleet-rows a[href='#job/{long_job}']", timeout=30_000)
    shoot(page, out, "fleet")
    page.wait_for_function(f"{running}?.status === 'succeeded'", timeout=300_000)

    # A call: the fake microphone speaks the test recording; the picture is taken mid-call.
    page.click(".tabs [data-tab=talk]")
    page.wait_for_function("document.getElementById('voice')?.options.length >= 18")
    page.click("#call")
    page.wait_for_function(
        "window.chatState.audioFrames >= 60 && window.chatState.text.length > 40", timeout=120_000
    )
    shoot(page, out, "conversation")
    page.click("#hangup")
    page.wait_for_function("window.chatState.closed", timeout=10_000)

    page.click(".tabs [data-tab=voices]")
    page.wait_for_function("document.querySelectorAll('#voices-list li').length >= 18")
    page.set_input_files("#voices-file", str(clips["customer-call.wav"]))
    page.fill("#voices-name", "Support desk")
    page.check("#voices-consent")
    page.click("#voices-upload")
    page.wait_for_function("window.voicesState.ids.includes('custom-support-desk')", timeout=60_000)
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, out, "voices")


# -- optimising ------------------------------------------------------------------------------------


def optimise(path: Path) -> None:
    """pngquant if it is installed (lossy, much smaller); otherwise the pixels recompressed at zlib's
    best level (Chromium writes PNGs for speed, not size)."""
    pngquant = shutil.which("pngquant")
    if pngquant:
        subprocess.run(
            [pngquant, "--force", "--skip-if-larger", "--quality", "70-95", "--output", str(path), str(path)],
            check=False,
        )
        return
    recompress(path)


def recompress(path: Path) -> None:
    """Rewrite the PNG with its image data deflated at level 9; every pixel stays as it was."""
    data = path.read_bytes()
    signature, chunks, offset = data[:8], [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunks.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    packed = zlib.compress(pixels, 9)
    out = [signature]
    for kind, body in chunks:
        if kind == b"IDAT":
            if packed is None:
                continue  # every IDAT but the first: the image data is one chunk now
            body, packed = packed, None
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    smaller = b"".join(out)
    if len(smaller) < len(data):
        path.write_bytes(smaller)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/screenshots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="where the PNGs go")
    parser.add_argument("--width", type=int, default=1000, help="viewport width, CSS px")
    parser.add_argument("--workdir", type=Path, help="the stack's model, data and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-shots-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        clips = write_clips(workdir / "clips")
        with local_service(workdir) as url, browser_page(args.width) as page:
            take_all(page, url, args.out.resolve(), clips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
