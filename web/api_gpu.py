"""GET /api/gpu/status and POST /api/gpu/offload: the fleet of GPU workers.

Status merges two sources: each live worker's heartbeat record in Redis and, fresher, the replies
to a `gpu_status` control broadcast (answered within ~25 ms even mid-job; we wait at most 1 s).

With per-client keys, status is for every key but a client key does not see which jobs run (they may
be another client's); offload acts on the whole fleet, so it takes an admin key.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from flask import Blueprint, Response, jsonify, request

from personaplex.fleet import OffloadReply, OffloadStatus, WorkerRecord
from web import schemas
from web.auth import current_principal, require_admin
from web.errors import ApiError
from web.schemas import WorkerSource, answer
from web.services import Services, services
from worker.control import query_gpu_status, request_offload

log = logging.getLogger(__name__)

bp = Blueprint("gpu", __name__, url_prefix="/api/gpu")

CONTROL_TIMEOUT_S = 1.0
"""Seconds to wait for workers to answer a control command."""

_MEMORY_FIELDS = ("memory_total", "memory_allocated", "memory_reserved")
_JOB_FIELDS = ("running_job", "running_jobs", "progress")
"""Worker fields naming jobs: left out for client keys (active_connections still counts them)."""


def live_status(svc: Services, expected: int) -> dict[str, WorkerRecord]:
    """Fresh gpu_status replies of the live workers (`expected` of them, by the heartbeats)."""
    return query_gpu_status(svc.celery, timeout=CONTROL_TIMEOUT_S, expected=expected or None)


def offload_workers(svc: Services, worker: str | None, expected: int) -> list[OffloadReply]:
    """Offload replies of every live worker, or of the one named, each with its "worker" name."""
    replies = request_offload(
        svc.celery, [worker] if worker else None, timeout=CONTROL_TIMEOUT_S, expected=expected or None
    )
    return [cast(OffloadReply, {"worker": name, **(body or {})}) for name, body in replies.items()]


def fleet(svc: Services) -> list[dict[str, Any]]:
    """One record per live worker: the heartbeat, overlaid by a fresh control reply when one came,
    each with its `source`."""
    records: dict[str, dict[str, Any]] = {
        w["worker"]: {**w, "source": WorkerSource.HEARTBEAT} for w in svc.workers.live()
    }
    try:
        replies = live_status(svc, len(records))
    except Exception as exc:  # kombu errors vary; heartbeats still describe the fleet
        log.warning("gpu_status broadcast failed: %s", exc)
        replies = {}
    for name, reply in replies.items():
        records[name] = {
            **records.get(name, {}),
            "worker": name,
            **(reply or {}),
            "source": WorkerSource.LIVE,
        }
    return [records[name] for name in sorted(records, key=str)]


def summarize(workers: list[dict[str, Any]], idle_timeout: float) -> dict[str, Any]:
    """The legacy server's single-GPU fields, computed over the fleet (memory summed over workers)."""
    gpus = [w.get("gpu") or {} for w in workers]
    names = sorted({g["name"] for g in gpus if g.get("name")})
    return {
        "model_loaded": any(bool(w.get("model_loaded")) for w in workers),
        "active_connections": sum(int(w.get("active_connections") or 0) for w in workers),
        "live_sessions": sum(int(w.get("live_sessions") or 0) for w in workers),
        "idle_timeout": idle_timeout,
        "gpu": {
            "name": ", ".join(names) or None,
            **{f: round(sum(float(g.get(f) or 0.0) for g in gpus), 1) for f in _MEMORY_FIELDS},
        },
        "worker_count": len(workers),
        "workers": workers,
    }


@bp.get("/status")
def gpu_status() -> Response:
    svc = services()
    workers = fleet(svc)
    if not current_principal().admin:
        workers = [{k: v for k, v in w.items() if k not in _JOB_FIELDS} for w in workers]
    return jsonify(answer(schemas.GpuStatus, summarize(workers, svc.settings.gpu_idle_timeout)))


@bp.post("/offload")
def offload() -> Response:
    require_admin("POST /api/gpu/offload")
    svc = services()
    worker = request.args.get("worker") or None
    replies = offload_workers(svc, worker, len(svc.workers.live()))
    if worker and not replies:
        raise ApiError(404, f"Worker {worker[:128]!r} did not answer within {CONTROL_TIMEOUT_S:g} s.")
    body = {
        "status": OffloadStatus.strongest(r.get("status") for r in replies),
        "memory_allocated": round(sum(float(r.get("memory_allocated") or 0.0) for r in replies), 1),
        "workers": replies,
    }
    return jsonify(answer(schemas.OffloadResult, body))
