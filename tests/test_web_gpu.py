"""web/api_gpu.py: GET /api/gpu/status summarises the workers' heartbeats (the legacy server's
single-GPU fields over the fleet); POST /api/gpu/offload without workers, and for an unknown one.

The status is read over the real werkzeug server; the offload answers go through Flask's test client.
With a real worker, both are checked in tests/test_web_end_to_end.py.
"""

from __future__ import annotations

import redis
from web_helpers import HEX_ID, AppClient, Live, beat


def test_gpu_status_from_heartbeats(live: Live, redis_client: redis.Redis) -> None:
    gpu = {"name": "H100", "memory_total": 80000.0, "memory_allocated": 15000.0, "memory_reserved": 16000.0}
    batch = [HEX_ID, "b" * 32, "c" * 32]
    beat(redis_client, "gpu0@a", model_loaded=True, device="cuda:0", gpu=gpu, running_job=HEX_ID,
         running_jobs=batch, active_connections=3)  # fmt: skip
    beat(redis_client, "gpu1@b", model_loaded=False, device="cuda:0", gpu={**gpu, "memory_allocated": 0.0})
    status = live.get("/api/gpu/status").json()
    assert status["worker_count"] == 2
    assert [w["worker"] for w in status["workers"]] == ["gpu0@a", "gpu1@b"]
    assert status["model_loaded"] is True and status["active_connections"] == 3  # every job of the batch
    assert status["gpu"]["name"] == "H100"
    assert status["gpu"]["memory_total"] == 160000.0 and status["gpu"]["memory_allocated"] == 15000.0
    assert status["idle_timeout"] == 300.0


def test_offload_without_workers(app_client: AppClient) -> None:
    response = app_client.post("/api/gpu/offload")
    assert response.status_code == 200
    assert response.json == {"status": "not_loaded", "memory_allocated": 0.0, "workers": []}
    unknown = app_client.post("/api/gpu/offload", query_string={"worker": "nobody@nowhere"})
    assert unknown.status_code == 404 and "nobody@nowhere" in unknown.json["error"]
