"""Across the blueprints, with a real `celery -A worker worker` subprocess on the tiny model: submit
(web/api_jobs.py), its events (web/api_events.py), the synchronous call (web/api_offline.py), GPU
status and offload (web/api_gpu.py) and /health (web/health.py) on one job's way; then status,
offload and cancel while that worker is busy. Over the real werkzeug server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fixtures import events_until_closed, speech_clip
from web_helpers import Live, queued, wav_seconds

from personaplex.audio import encode_wav


@pytest.mark.slow
def test_end_to_end_with_a_real_worker(
    serve: Callable[..., Live], start_worker: Callable[..., Any], speech: np.ndarray
) -> None:
    live = serve(max_audio_seconds=60.0, offline_timeout=120.0)
    start_worker("gpu0")
    clip = encode_wav(speech[: 3 * 24000], 24000, subtype="PCM_16")

    job_id = queued(live, clip, voice_prompt="NATF0", seed="1234")  # no ".pt": the worker still finds it
    events = events_until_closed(live.ws(job_id), timeout=120)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "state" and kinds[-1] == "succeeded", kinds
    assert "progress" in kinds and ("started" in kinds or events[0]["status"] != "queued")

    job = live.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["worker"] == "gpu0@test" and job["attempts"] == 1
    assert job["params"]["voice_prompt"] == "NATF0.pt"
    assert {"queue_wait_s", "inference_s", "rtf"} <= set(job["result"]["timings"])
    audio = live.get(f"/api/jobs/{job_id}/audio")
    assert audio.headers["Content-Type"] == "audio/wav"
    assert wav_seconds(audio.content) == pytest.approx(3.0, abs=0.01)
    text = live.get(f"/api/jobs/{job_id}/text").json()
    assert len(text["frames"]) == job["result"]["frames"] > 0

    offline = live.post("/api/offline", files={"file": ("q.wav", clip)}, data={"seed": "5"}, timeout=150)
    assert offline.status_code == 200, offline.text
    assert wav_seconds(offline.content) == pytest.approx(3.0, abs=0.01)
    assert isinstance(json.loads(offline.headers["X-Text-Output"]), list)

    started = time.monotonic()
    status = live.get("/api/gpu/status").json()
    assert time.monotonic() - started < 1.0  # the heartbeat tells how many replies to wait for
    (worker,) = status["workers"]
    assert worker["worker"] == "gpu0@test" and worker["source"] == "live"
    assert status["model_loaded"] is True
    offload = live.post("/api/gpu/offload", params={"worker": "gpu0@test"}).json()
    assert offload["status"] == "offloaded" and offload["workers"][0]["worker"] == "gpu0@test"
    assert live.get("/api/gpu/status").json()["model_loaded"] is False
    assert live.get("/health").json()["status"] == "healthy"


@pytest.mark.slow
def test_status_offload_and_cancel_while_a_real_worker_runs_a_job(
    serve: Callable[..., Live], start_worker: Callable[..., Any]
) -> None:
    live = serve(max_audio_seconds=600.0, max_upload_mb=64.0)
    start_worker("gpu0")
    # Seconds of work even on a fast CPU: the job is still running below.
    job_id = queued(live, speech_clip(300.0))
    ws = live.ws(job_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        message = ws.receive(timeout=1)
        if message and json.loads(message).get("phase") == "generate":
            break
    else:
        pytest.fail("no generate progress within 120 s")
    started = time.monotonic()
    status = live.get("/api/gpu/status").json()
    assert time.monotonic() - started < 1.0  # answered by the busy worker itself
    assert status["active_connections"] == 1 and status["workers"][0]["running_job"] == job_id
    assert status["workers"][0]["source"] == "live"
    offload = live.post("/api/gpu/offload")
    assert offload.json()["status"] == "deferred"
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 202, response.text
    events = events_until_closed(ws, timeout=60)
    assert events[-1]["type"] == "cancelled"
    assert live.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"
