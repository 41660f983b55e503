"""Plain helpers for the web tests (tests/test_web_*.py); their fixtures live in tests/conftest.py.

- `Live`: a running web server (the real werkzeug one, in a thread) plus the stores behind it, as a
  worker would see them; requests go over real HTTP.
- `AppClient`: the same app and stores through Flask's test client, no server: for tests of one
  request's validation or error answer.
- `queued`, `finish_like_a_worker`, `beat`: submit a job, play a worker's part through the real
  stores (so no model is needed), write a worker's heartbeat.

Imported as `web_helpers` (tests/ is on sys.path because it has no __init__.py), like `fixtures`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import redis
import requests
import simple_websocket
from fixtures import ws_connect
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from personaplex.audio import encode_wav, load, probe
from personaplex.jobs import JobStore, WorkerRegistry
from personaplex.params import EngineResult
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, FsBlobStore
from web.server_thread import ServerThread

API_KEY = "s3cret-key"
HEX_ID = "0123456789abcdef0123456789abcdef"

SMALL_LIMITS: dict[str, Any] = {"max_upload_mb": 1.0, "max_audio_seconds": 10.0, "offline_timeout": 5.0}
"""The settings overrides the web tests run under unless they say otherwise."""


class Live:
    """A running server plus the stores behind it, as a worker would see them."""

    def __init__(self, server: ServerThread, data_dir: Path, client: redis.Redis) -> None:
        self.server = server
        self.url = server.url
        self.jobs = JobStore(client, retention_s=3600.0)
        self.blobs = FsBlobStore(data_dir)
        self.headers: dict[str, str] = {}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, **{"timeout": 30, **kwargs})

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, **{"timeout": 30, **kwargs})

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, headers=self.headers, timeout=30)

    def submit(self, audio: bytes, name: str = "clip.wav", **fields: Any) -> requests.Response:
        return self.post("/api/jobs", files={"file": (name, audio)}, data=fields)

    def ws(self, job_id: str, query: str = "") -> simple_websocket.Client:
        ws_url = self.url.replace("http://", "ws://") + f"/api/jobs/{job_id}/events{query}"
        return ws_connect(ws_url, self.headers)


class AppClient:
    """The app through Flask's test client (no server, no socket) plus the stores behind it.

    Answers are werkzeug `TestResponse`s: `.json` is a property there, `.text` and `.headers` as in
    requests. `get(path, query_string=...)` takes the query where requests takes `params`.
    """

    def __init__(self, app: Flask, data_dir: Path, client: redis.Redis) -> None:
        self.app = app
        self.client: FlaskClient = app.test_client()
        self.jobs = JobStore(client, retention_s=3600.0)
        self.blobs = FsBlobStore(data_dir)
        self.headers: dict[str, str] = {}

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.get(path, headers=self.headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.post(path, headers=self.headers, **kwargs)

    def delete(self, path: str) -> TestResponse:
        return self.client.delete(path, headers=self.headers)

    def upload(self, path: str, audio: bytes, name: str = "clip.wav", **fields: Any) -> TestResponse:
        """POST `audio` as the multipart field `file` (as `name`) with the form `fields` to `path`."""
        data = {"file": (io.BytesIO(audio), name), **fields}
        return self.post(path, data=data, content_type="multipart/form-data")

    def submit(self, audio: bytes, name: str = "clip.wav", **fields: Any) -> TestResponse:
        return self.upload("/api/jobs", audio, name, **fields)


def queued(live: Live, clip: bytes, **fields: Any) -> str:
    """Submit `clip` with the form `fields`; the new job's id (asserting a 202)."""
    response = live.submit(clip, **fields)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def finish_like_a_worker(live: Live, job_id: str, text: str = "hello there") -> None:
    """What the worker does for a job, through the same stores (used where no model is needed)."""
    live.jobs.mark_running(job_id, "fake@test")
    live.jobs.set_progress(job_id, "generate", 5, 10)
    audio = load(live.blobs.get(job_id, INPUT))[:2400]
    frames = ["PAD", " hello", " there", "EPAD", "PAD"]
    result = EngineResult(audio=audio, text_frames=frames, tokens=[], input_duration_s=0.1)
    document = {**result.text_document(), "text": text}
    live.blobs.put(job_id, OUTPUT_WAV, encode_wav(audio, result.sample_rate))
    live.blobs.put(job_id, OUTPUT_JSON, json.dumps(document).encode())
    live.jobs.mark_succeeded(job_id, {"text": text, "duration_s": 0.1})


def beat(client: redis.Redis, name: str, **record: Any) -> None:
    """A heartbeat of worker `name` (idle, on the CPU, no model unless `record` says otherwise)."""
    base = {"model_loaded": False, "device": "cpu", "gpu": {}, "running_job": None, "progress": None}
    WorkerRegistry(client).beat(name, {**base, **record}, ttl_s=30)


def wav_seconds(data: bytes) -> float:
    """Duration of an audio file's bytes, in seconds."""
    return probe(data, None).duration_s
