"""WS /api/jobs/<id>/events: the job's state at once, then its events until it is final.

Events come from the worker through Redis pub/sub, fanned out by the process's one subscription
(web/pubsub.py), so an open socket holds no Redis connection. The socket registers for its job's
events before it reads the job record, so nothing falls between; nothing is polled. If the
subscription breaks, the socket stays open and sends the job's state again once it is back (events in
between are lost); after OUTAGE_GRACE_S without Redis it closes with 1011.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from typing import Any

from flask import Blueprint, request
from flask_sock import Sock
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from simple_websocket import ConnectionClosed, Server
from wsproto.utilities import LocalProtocolError

from personaplex.conversations import CLOSE_NORMAL
from personaplex.jobs import Job, is_valid_job_id
from web import schemas
from web.api_jobs import job_view
from web.auth import current_principal
from web.errors import ApiError
from web.pubsub import Notice, Waiter, is_final_event, subscription
from web.schemas import answer
from web.services import Services, services

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/api/jobs")
sock = Sock()

WAIT_SLICE_S = 1.0
"""Seconds between checks that the client is still connected (a closed socket ends within this)."""

OUTAGE_GRACE_S = 30.0
"""Seconds a socket waits for the events subscription to come back before it gives up with 1011."""

CLOSE_HANDSHAKE_WAIT_S = 1.0
"""How long a closing socket waits for the client's half of the closing handshake."""

CLOSE_POLICY_VIOLATION = 1008
CLOSE_SERVER_ERROR = 1011


@bp.before_request
def require_websocket_upgrade() -> None:
    """A plain HTTP request gets a 400 that says what to do, not the server's generic one."""
    upgrade = request.headers.get("Upgrade", "").lower()
    if upgrade != "websocket":
        raise ApiError(
            400, "This route is a WebSocket: connect with ws:// (or wss://) and Upgrade: websocket."
        )


def finish_close(ws: Server) -> None:
    """Close cleanly (1000, unless the handler closed already), let simple-websocket finish the
    closing handshake, then shut the connection down.

    Under the development server (werkzeug) the socket outlives the handler: werkzeug then writes
    an HTTP response on it, which a browser reads as a broken frame (close 1006 instead of the
    clean close it already had). Once the close frames have crossed, nothing more belongs on it.
    """
    if ws.connected:
        with contextlib.suppress(ConnectionClosed, LocalProtocolError):  # the client closed first
            ws.close(reason=CLOSE_NORMAL)
    ws.thread.join(CLOSE_HANDSHAKE_WAIT_S)
    with contextlib.suppress(OSError):
        ws.sock.shutdown(socket.SHUT_RDWR)


@sock.route("/<job_id>/events", bp=bp)
def job_events(ws: Server, job_id: str) -> None:
    try:
        _serve(ws, job_id)
    finally:
        finish_close(ws)


def _serve(ws: Server, job_id: str) -> None:
    if not is_valid_job_id(job_id):
        _fail(ws, CLOSE_POLICY_VIOLATION, _missing(job_id))
        return
    svc = services()
    try:
        with subscription(svc, job_id) as waiter:  # before the read: no event falls between
            job = svc.jobs.get(job_id)
            if job is None or not current_principal().can_see(job.owner):
                _fail(ws, CLOSE_POLICY_VIOLATION, _missing(job_id))
                return
            _send_state(ws, job)
            if not job.status.is_final:
                _relay(ws, svc, waiter)
    except RedisError as exc:
        log.warning("Event stream for job %s lost Redis: %s", job_id, exc)
        _fail(ws, CLOSE_SERVER_ERROR, f"Redis is unreachable ({exc}).")


def _missing(job_id: str) -> str:
    return f"Job {job_id[:64]!r} doesn't exist (or has expired)."


def _relay(ws: Server, svc: Services, waiter: Waiter) -> None:
    """Send the job's events until the final one, the client leaves, or Redis stays away too long."""
    lost_at: float | None = None
    while ws.connected:
        item = waiter.get(WAIT_SLICE_S)
        if item is Notice.LOST:
            lost_at = time.monotonic()
        elif item is Notice.RESUMED:
            lost_at = None
            if _resync(ws, svc, waiter.job_id):
                return
        elif isinstance(item, dict):
            _send(ws, item)
            if is_final_event(item):
                return
        if lost_at is not None and time.monotonic() - lost_at > OUTAGE_GRACE_S:
            raise RedisConnectionError(f"no events subscription for {OUTAGE_GRACE_S:g} s")


def _resync(ws: Server, svc: Services, job_id: str) -> bool:
    """After an outage, send the job's state as it stands now; True if the stream is over."""
    job = svc.jobs.get(job_id)
    if job is None:
        message = f"Job {job_id} doesn't exist any more: Redis lost it while the events were cut off."
        _fail(ws, CLOSE_SERVER_ERROR, message)
        return True
    _send_state(ws, job)
    return job.status.is_final


def _send_state(ws: Server, job: Job) -> None:
    state = {"type": "state", "job_id": job.id, "status": job.status.value, "job": job_view(job)}
    _send(ws, answer(schemas.Event, state))


def _send(ws: Server, event: dict[str, Any]) -> None:
    ws.send(json.dumps(event))


def _fail(ws: Server, code: int, message: str) -> None:
    _send(ws, {"type": "error", "error": message})
    ws.close(reason=code, message=message[:120])
