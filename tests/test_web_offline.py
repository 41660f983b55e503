"""web/api_offline.py: POST /api/offline, the legacy-compatible synchronous call: it waits for the job
and answers the WAV with the text in a header, or 504 with the job's id when the wait runs out.

The waiting tests run on the real werkzeug server (a request held open while a thread plays the
worker); the validation test goes through Flask's test client.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import redis
from fixtures import wait_until
from web_helpers import AppClient, Live, finish_like_a_worker

from personaplex.jobs import JobStatus, Keys


def test_offline_waits_and_returns_wav_with_text_header(
    live: Live, clip: bytes, redis_client: redis.Redis
) -> None:
    def fake_worker() -> None:
        job_id = wait_until(lambda: redis_client.zrange(Keys.QUEUED, 0, 0), 10, what="a queued job")[
            0
        ].decode()
        finish_like_a_worker(live, job_id, text="héllo")

    thread = threading.Thread(target=fake_worker)
    thread.start()
    response = live.post("/api/offline", files={"file": ("q.wav", clip)}, data={"voice_prompt": "NATF1"})
    thread.join()
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.content[:4] == b"RIFF"
    assert json.loads(response.headers["X-Text-Output"]) == [" hello", " there"]
    assert live.jobs.get(response.headers["X-Job-Id"]).params["voice_prompt"] == "NATF1.pt"


def test_offline_answers_504_with_the_job_id_when_the_wait_runs_out(
    serve: Callable[..., Live], clip: bytes
) -> None:
    live = serve(offline_timeout=1.0)
    started = time.monotonic()
    response = live.post("/api/offline", files={"file": ("q.wav", clip)})
    assert response.status_code == 504
    assert 1.0 <= time.monotonic() - started < 5.0
    body = response.json()
    assert live.jobs.get(body["job_id"]).status is JobStatus.QUEUED  # it goes on
    assert body["urls"]["self"] == f"/api/jobs/{body['job_id']}"


def test_offline_validates_like_submit(app_client: AppClient) -> None:
    response = app_client.upload("/api/offline", b"nope", "x.wav", seed="1")
    assert response.status_code == 400
