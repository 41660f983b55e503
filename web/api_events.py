"""WS /api/jobs/<id>/events: the job's state at once, then its events until it is final.

Events come from the worker through Redis pub/sub (one subscription per socket); the job record is
read once, after subscribing, so nothing is missed and nothing is polled.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint
from flask_sock import Sock
from redis.client import PubSub
from redis.exceptions import RedisError
from simple_websocket import Server

from personaplex.jobs import is_valid_job_id
from web.api_jobs import job_view
from web.auth import current_principal
from web.pubsub import is_final_event, next_event, subscription
from web.services import services

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/api/jobs")
sock = Sock()

WAIT_SLICE_S = 1.0
"""Seconds between checks that the client is still connected."""

CLOSE_POLICY_VIOLATION = 1008
CLOSE_SERVER_ERROR = 1011


@sock.route("/<job_id>/events", bp=bp)
def job_events(ws: Server, job_id: str) -> None:
    if not is_valid_job_id(job_id):
        _fail(ws, CLOSE_POLICY_VIOLATION, _missing(job_id))
        return
    svc = services()
    try:
        with subscription(svc, job_id) as pubsub:
            job = svc.jobs.get(job_id)
            if job is None or not current_principal().can_see(job.owner):
                _fail(ws, CLOSE_POLICY_VIOLATION, _missing(job_id))
                return
            _send(ws, {"type": "state", "job_id": job.id, "status": job.status.value, "job": job_view(job)})
            if not job.status.is_final:
                _relay(ws, pubsub)
    except RedisError as exc:
        log.warning("Event stream for job %s lost Redis: %s", job_id, exc)
        _fail(ws, CLOSE_SERVER_ERROR, f"Redis is unreachable ({exc}).")


def _missing(job_id: str) -> str:
    return f"Job {job_id[:64]!r} doesn't exist (or has expired)."


def _relay(ws: Server, pubsub: PubSub) -> None:
    while ws.connected:
        event = next_event(pubsub, WAIT_SLICE_S)
        if event is None:
            continue
        _send(ws, event)
        if is_final_event(event):
            return


def _send(ws: Server, event: dict[str, Any]) -> None:
    ws.send(json.dumps(event))


def _fail(ws: Server, code: int, message: str) -> None:
    _send(ws, {"type": "error", "error": message})
    ws.close(reason=code, message=message[:120])
