"""GET /health: Redis reachable, workers alive, queue length, live slots. 503 within 2 s when Redis
is down.

`gpu_available`, `model_loaded` and `live_slots_free` are read from the workers' heartbeat records
(personaplex.fleet), so they are up to a third of PERSONAPLEX_HEARTBEAT_TTL old.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError

from personaplex.conversations import Conversations
from personaplex.fleet import WorkerRecord, gpu_available
from personaplex.jobs import JobStore, WorkerRegistry
from web.schemas import Health, answer
from web.services import services

bp = Blueprint("health", __name__)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@bp.get("/health")
def health() -> tuple[Response, int]:
    client = services().health_redis  # short socket timeouts: never hangs
    try:
        client.ping()
        workers = WorkerRegistry(client).live()
        queue_length = JobStore(client).queue_length()
        live_waiting = Conversations(client).waiting()
    except RedisError as exc:
        return jsonify(answer(Health, _unhealthy(exc))), 503
    return jsonify(answer(Health, _report(workers, queue_length, live_waiting))), 200


def _report(workers: list[WorkerRecord], queue_length: int, live_waiting: int) -> dict[str, Any]:
    return {
        "status": "healthy" if workers else "degraded",
        "gpu_available": any(gpu_available(w) for w in workers),
        "model_loaded": any(bool(w.get("model_loaded")) for w in workers),
        "timestamp": _now(),
        "redis": "ok",
        "workers": len(workers),
        "queue_length": queue_length,
        "live_slots_free": sum(int(w.get("live_slots_free") or 0) for w in workers),
        "live_waiting": live_waiting,
        **({} if workers else {"detail": "No worker is alive: jobs wait until one starts."}),
    }


def _unhealthy(exc: Exception) -> dict[str, Any]:
    return {
        "status": "unhealthy",
        "error": f"Redis is unreachable ({exc}).",
        "gpu_available": False,
        "model_loaded": False,
        "timestamp": _now(),
        "redis": "unreachable",
        "workers": 0,
        "queue_length": None,
        "live_slots_free": 0,
        "live_waiting": None,
    }
