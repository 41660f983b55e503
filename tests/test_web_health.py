"""web/health.py: GET /health reports Redis, the live workers and the queue; it answers 503 within 2 s
while Redis is down or hangs, and recovers with it.

Over the real werkzeug server (the timings are of real HTTP requests); the last test runs a real
`celery -A worker worker` subprocess on the tiny model through a Redis restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from fixtures import RedisServer, wait_until
from web_helpers import Live, beat, queued

from personaplex.audio import encode_wav


def test_health_reports_workers_and_queue(live: Live, clip: bytes, redis_client: redis.Redis) -> None:
    report = live.get("/health").json()
    assert report["status"] == "degraded" and report["workers"] == 0
    queued(live, clip)
    beat(redis_client, "gpu0@host", model_loaded=True, device="cuda:0")
    report = live.get("/health").json()
    assert report["status"] == "healthy"
    assert report["workers"] == 1 and report["queue_length"] == 1
    assert report["gpu_available"] is True and report["model_loaded"] is True
    assert "timestamp" in report


def test_health_is_503_within_2_s_while_redis_is_down_and_recovers(
    live: Live, redis_server: RedisServer
) -> None:
    assert live.get("/health").status_code == 200
    redis_server.stop()
    try:
        started = time.monotonic()
        response = live.get("/health")
        assert time.monotonic() - started < 2.0
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        down = live.get("/api/jobs")
        assert down.status_code == 503 and "Redis" in down.json()["error"]
    finally:
        redis_server.start()
    assert live.get("/health").status_code == 200
    assert live.get("/api/jobs").status_code == 200


def test_health_is_503_within_2_s_while_redis_hangs(live: Live, redis_server: RedisServer) -> None:
    assert live.get("/health").status_code == 200
    redis_server.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        response = live.get("/health")
        elapsed = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert response.status_code == 503 and elapsed < 2.0
    assert live.get("/health").status_code == 200


@pytest.mark.slow
def test_a_redis_restart_with_a_live_worker_shows_in_health_and_the_service_recovers(
    serve: Callable[..., Live],
    start_worker: Callable[..., Any],
    redis_server: RedisServer,
    speech: np.ndarray,
) -> None:
    live = serve()
    start_worker("gpu0")
    wait_until(lambda: live.get("/health").json()["status"] == "healthy", 30, what="the worker's heartbeat")
    redis_server.stop()  # no persistence: the queue, the records and the heartbeats are gone
    try:
        started = time.monotonic()
        down = live.get("/health")
        assert down.status_code == 503 and time.monotonic() - started < 2.0
        assert down.json()["status"] == "unhealthy"
        time.sleep(1.0)  # the worker's connection breaks too
    finally:
        redis_server.start()
    wait_until(lambda: live.get("/health").json()["status"] == "healthy", 30, what="the worker to beat again")
    job_id = queued(live, encode_wav(speech[:24000], 24000, subtype="PCM_16"))
    done = wait_until(
        lambda: (j := live.get(f"/api/jobs/{job_id}").json())["status"] == "succeeded" and j, 60
    )
    assert done["worker"] == "gpu0@test"
