"""Hardening at the door (issue 10, items 4 and 6), over the real werkzeug server (and gunicorn for
its own errors) against the private redis-server: what must be a 4xx or a 507 instead of a 500, and
names that survive as they were sent.

- Audio the worker would refuse is refused at upload: over the decode budget, NaN or infinite samples.
- A full data directory answers 507 and leaves nothing behind; so does Redis out of memory.
- The servers' own errors (414, 431, ...) are JSON like every other error.
- Unicode names keep their letters and extension; long names are cut so archives still extract.
- The DELETE of a running job says what happens next.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from fixtures import REPO_ROOT, SPEECH_20S, free_port, silent_flac, wait_until

from personaplex.audio import MAX_DECODED_SAMPLES, encode_wav, load
from personaplex.jobs import JobStore
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, FsBlobStore
from web.server_thread import ServerThread
from web.validation import MAX_INPUT_NAME_BYTES, safe_input_name

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load(SPEECH_20S)


def _wav(speech: np.ndarray, seconds: float, subtype: str = "PCM_16") -> bytes:
    return encode_wav(speech[: int(seconds * 24_000)], 24_000, subtype=subtype)


@pytest.fixture
def serve(start_web: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    defaults = {"max_upload_mb": 4.0, "max_audio_seconds": 60.0, "offline_timeout": 2.0}
    return lambda **overrides: start_web(**{**defaults, **overrides})


def _submit(url: str, audio: bytes, name: str = "clip.wav") -> requests.Response:
    return requests.post(f"{url}/api/jobs", files={"file": (name, audio)}, timeout=30)


def _batch(url: str, files: list[tuple[str, bytes]]) -> requests.Response:
    fields = [("files", (name, data)) for name, data in files]
    return requests.post(f"{url}/api/batches", files=fields, timeout=30)


def _job_count(url: str) -> int:
    return requests.get(f"{url}/api/jobs", params={"limit": 500}, timeout=10).json()["count"]


# -- item 4: the decode budget at upload ---------------------------------------------------------


def test_a_file_over_the_decode_budget_is_a_400_naming_the_limit(
    serve: Callable[..., ServerThread],
) -> None:
    """384 kHz, 8 channels, 40 s of silence: a 130 KB FLAC that decodes to 492 MB of float32."""
    url = serve().url
    crafted = silent_flac(384_000, 8, 40)
    for response in (_submit(url, crafted, "crafted.flac"), _batch(url, [("crafted.flac", crafted)])):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "122,880,000 samples" in error and f"the limit is {MAX_DECODED_SAMPLES:,} samples" in error
    legal = silent_flac(96_000, 6, 3)  # high rate, many channels, far below the budget
    assert _submit(url, legal, "legal.flac").status_code == 202
    assert _job_count(url) == 1


# -- item 6: NaN and infinity at upload ------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_wavs_are_refused_at_upload_everywhere(
    serve: Callable[..., ServerThread], speech: np.ndarray, bad: float
) -> None:
    url = serve().url
    samples = speech[: 2 * 24_000].copy()
    samples[1000:1010] = bad
    broken = encode_wav(samples, 24_000)  # float WAV: its header is sound
    responses = {
        "jobs": _submit(url, broken, "broken.wav"),
        "batches": _batch(url, [("good.wav", _wav(speech, 1.0)), ("broken.wav", broken)]),
        "offline": requests.post(f"{url}/api/offline", files={"file": ("broken.wav", broken)}, timeout=30),
    }
    for route, response in responses.items():
        assert response.status_code == 400, (route, response.text)
        assert "NaN or infinite samples" in response.json()["error"], route
    assert "broken.wav" in responses["batches"].json()["error"]
    assert _job_count(url) == 0


# -- item 6: a full disk, Redis out of memory -------------------------------------------------------


class QuotaBlobStore(FsBlobStore):
    """The real FsBlobStore with a byte quota: a write past it fails as a full disk does (ENOSPC),
    after its job's folder was made. Stands in for a small tmpfs where mounting is not allowed."""

    def __init__(self, root: Path, quota: int) -> None:
        super().__init__(root)
        self.quota = quota

    def put(self, job_id: str, name: str, data: bytes) -> None:
        used = sum(p.stat().st_size for p in (self.root / "jobs").rglob("*") if p.is_file())
        if used + len(data) > self.quota:
            self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path(job_id, name)))
        super().put(job_id, name, data)


FULL_DISK_BYTES = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """(a data directory on a 1 MB tmpfs, True), or (a plain folder, False) where mount is refused
    (not root): then the test injects QuotaBlobStore."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount = shutil.which("mount")
    mounted = bool(mount) and (
        subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={FULL_DISK_BYTES}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _leftovers(data_dir: Path) -> list[str]:
    jobs = data_dir / "jobs"
    return sorted(str(p.relative_to(data_dir)) for p in jobs.rglob("*")) if jobs.exists() else []


def test_a_full_data_directory_is_507_and_leaves_nothing_behind(
    serve: Callable[..., ServerThread],
    small_disk: tuple[Path, bool],
    speech: np.ndarray,
    redis_client: redis.Redis,
) -> None:
    data_dir, mounted = small_disk
    server = serve(data_dir=data_dir)
    if not mounted:
        server.app.extensions["personaplex"].blobs = QuotaBlobStore(data_dir, FULL_DISK_BYTES)
    url = server.url
    too_big = _wav(speech, 16.0, "FLOAT")  # 1.5 MB
    assert len(too_big) > FULL_DISK_BYTES
    response = _submit(url, too_big)
    assert response.status_code == 507, response.text
    assert "data directory is full" in response.json()["error"]
    # A batch whose third input no longer fits: the first two inputs are deleted again.
    parts = [(f"part{i}.wav", _wav(speech[i * 24_000 :], 8.0)) for i in range(3)]  # 384 KB each
    response = _batch(url, parts)
    assert response.status_code == 507, response.text
    assert "data directory is full" in response.json()["error"]
    assert _job_count(url) == 0
    assert not list(redis_client.scan_iter("personaplex:batch:*"))
    assert _leftovers(data_dir) == []  # no input, no folder, no temporary file
    assert _submit(url, _wav(speech, 1.0)).status_code == 202  # what fits is still accepted
    assert _job_count(url) == 1


def test_redis_out_of_memory_is_507(
    serve: Callable[..., ServerThread], speech: np.ndarray, redis_client: redis.Redis, tmp_path: Path
) -> None:
    url = serve().url
    clip = _wav(speech, 1.0)
    previous = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)  # every write is refused with OOM
    try:
        responses = [_submit(url, clip), _batch(url, [("a.wav", clip), ("b.wav", clip)])]
    finally:
        redis_client.config_set("maxmemory", previous)
    for response in responses:
        assert response.status_code == 507, response.text
        assert "Redis is out of memory" in response.json()["error"]
    assert _job_count(url) == 0
    assert _leftovers(tmp_path / "data") == []


# -- item 6: the servers' own errors as JSON --------------------------------------------------------


def _raw(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """(status, content type, parsed JSON body) of a GET sent as is (no client-side limits)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        return response.status, response.getheader("Content-Type", ""), json.loads(body)
    finally:
        connection.close()


MANY_HEADERS = {f"X-Extra-{i}": "1" for i in range(120)}


def test_the_werkzeug_servers_own_errors_are_json(serve: Callable[..., ServerThread]) -> None:
    port = serve().port
    cases = {
        "long request line": (_raw(port, "/api/jobs?q=" + "a" * 70_000), 414, "longer than 65536 bytes"),
        "long header line": (_raw(port, "/health", {"X-Big": "b" * 70_000}), 431, "headers are too large"),
        "too many headers": (_raw(port, "/health", MANY_HEADERS), 431, "more than 100 headers"),
    }
    for case, ((status, content_type, body), code, words) in cases.items():
        assert status == code, (case, body)
        assert content_type == "application/json", case
        assert words in body["error"], (case, body)
    # The app's own 414 and 431 (werkzeug exceptions) were JSON already; the app still answers.
    assert _raw(port, "/health")[0] == 200


def test_gunicorns_own_errors_are_json(redis_server: Any, tmp_path: Path) -> None:
    port = free_port()
    keep = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAPLEX_")}
    env = {**keep, "PYTHONPATH": str(REPO_ROOT), "REDIS_URL": redis_server.url}
    env.update(PERSONAPLEX_DATA_DIR=str(tmp_path / "data"), HOST="127.0.0.1")
    args = [GUNICORN, "-c", "python:web.gunicorn_conf", "-w", "1"]  # the production worker class
    args += ["-b", f"127.0.0.1:{port}", "web:create_app()"]
    with open(tmp_path / "gunicorn.log", "wb") as log:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        try:
            wait_until(lambda: _answers(port, process, tmp_path), 30, interval=0.2, what="gunicorn")
            cases = {
                "long request line": (_raw(port, "/api/jobs?q=" + "a" * 5000), 400, "Request Line"),
                "long header line": (_raw(port, "/health", {"X-Big": "b" * 9000}), 431, "Header"),
                "too many headers": (_raw(port, "/health", MANY_HEADERS), 431, "Header"),
            }
            for case, ((status, content_type, body), code, words) in cases.items():
                assert status == code, (case, body)
                assert content_type == "application/json", case
                assert words.lower() in body["error"].lower(), (case, body)
        finally:
            process.terminate()
            process.wait(timeout=20)


def _answers(port: int, process: subprocess.Popen, tmp_path: Path) -> bool:
    assert process.poll() is None, (tmp_path / "gunicorn.log").read_text(errors="replace")
    try:
        return _raw(port, "/health")[0] in (200, 503)
    except OSError:
        return False


# -- item 6: names ---------------------------------------------------------------------------------


def test_input_names_keep_unicode_and_extension_and_are_bounded() -> None:
    assert safe_input_name("日本語.wav") == "日本語.wav"
    assert safe_input_name("Ünïcödé café.flac") == "Ünïcödé_café.flac"
    assert safe_input_name("हिन्दी.ogg") == "हिन्दी.ogg"  # combining marks are letters' parts, kept
    assert safe_input_name("../../etc/passwd.wav") == "etc_passwd.wav"  # path parts joined, as before
    assert safe_input_name("C:\\Users\\me\\talk.wav") == "C_Users_me_talk.wav"
    assert safe_input_name("a\x00b\x1b[31mc\u202egnp.wav") == "ab31mcgnp.wav"  # controls, bidi override
    assert safe_input_name("_batch.json") == "batch.json"  # never the archive's manifest
    assert safe_input_name("") == safe_input_name("...") == "input.wav"
    long = safe_input_name("日" * 5000 + ".wav")
    assert long.endswith(".wav") and len(long.encode()) <= MAX_INPUT_NAME_BYTES
    assert long[:-4] == "日" * ((MAX_INPUT_NAME_BYTES - 4) // 3)  # cut at a character boundary
    odd = safe_input_name("x." + "y" * 500)  # an "extension" that long is part of the stem
    assert len(odd.encode()) == MAX_INPUT_NAME_BYTES and odd.startswith("x.yyy")


def _finish_like_a_worker(jobs: JobStore, blobs: FsBlobStore, job_id: str) -> None:
    jobs.mark_running(job_id, "fake@test")
    wav = encode_wav(load(blobs.get(job_id, INPUT))[:2400], 24_000)
    document = {"text": "hi", "frames": ["PAD", " hi"], "tokens": [], "duration_s": 0.1, "timings": {}}
    blobs.put(job_id, OUTPUT_WAV, wav)
    blobs.put(job_id, OUTPUT_JSON, json.dumps(document).encode())
    jobs.mark_succeeded(job_id, {"text": "hi", "duration_s": 0.1})


def test_unicode_and_long_names_survive_records_downloads_and_archives(
    serve: Callable[..., ServerThread], speech: np.ndarray, redis_client: redis.Redis, tmp_path: Path
) -> None:
    url = serve().url
    clip = _wav(speech, 0.5)
    long_name = "x" * 5000 + ".wav"
    job = _submit(url, clip, "日本語.wav").json()["job"]
    assert job["input_name"] == "日本語.wav"
    jobs, blobs = JobStore(redis_client, retention_s=3600.0), FsBlobStore(tmp_path / "data")
    _finish_like_a_worker(jobs, blobs, job["job_id"])
    download = requests.get(f"{url}/api/jobs/{job['job_id']}/audio", timeout=10)
    assert (
        "filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E_personaplex.wav"
        in download.headers["Content-Disposition"]
    )

    body = _batch(url, [("日本語.wav", clip), (long_name, clip)]).json()
    names = list(body["jobs"])
    assert names[0] == "日本語.wav" and names[1] == "x" * (MAX_INPUT_NAME_BYTES - 4) + ".wav"
    for job_id in body["jobs"].values():
        _finish_like_a_worker(jobs, blobs, job_id)
    archive = requests.get(f"{url}/api/batches/{body['batch_id']}/archive", timeout=30)
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        zipped.extractall(tmp_path / "out")  # a 5000-character member could not be written
        members = set(zipped.namelist())
    stem = "x" * (MAX_INPUT_NAME_BYTES - 4)
    assert {"日本語.wav", "日本語.json", f"{stem}.wav", f"{stem}.json"} <= members
    assert (tmp_path / "out" / "日本語.wav").is_file() and (tmp_path / "out" / f"{stem}.json").is_file()


# -- item 6: what a DELETE of a running job promises ------------------------------------------------


def test_deleting_a_running_job_says_what_happens_next(
    serve: Callable[..., ServerThread], speech: np.ndarray, redis_client: redis.Redis
) -> None:
    url = serve().url
    job_id = _submit(url, _wav(speech, 0.5)).json()["job_id"]
    jobs = JobStore(redis_client, retention_s=3600.0)
    jobs.mark_running(job_id, "fake@test")
    response = requests.delete(f"{url}/api/jobs/{job_id}", timeout=10)
    assert response.status_code == 202
    body = response.json()
    assert body["cancel_requested"] is True and body["status"] == "running"
    assert "decode chunk" in body["message"]
    assert jobs.cancel_requested(job_id)
