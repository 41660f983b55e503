"""POST /api/offline: the legacy server's synchronous call, now a queued job with a bounded wait.

Same fields as POST /api/jobs. It subscribes to the job's events before enqueueing, waits up to
`offline_timeout` seconds for a final event, and answers with the WAV and an `X-Text-Output` header
(a JSON array of the generated text pieces, ASCII-escaped). If the wait runs out: 504 with the job id,
and the job goes on; poll it at its URL.

The wait holds no Redis connection (the process's one subscription fans events out, web/pubsub.py)
and ends when the client hangs up: every WAIT_SLICE_S it peeks at the client's socket, which the WSGI
environ exposes as `werkzeug.socket` (the development server) or `gunicorn.socket` (every gunicorn
worker class: sync, gthread, gevent). The body has been read by then, so a waiting client sends
nothing: a readable socket with nothing to read is a closed one. Over TLS terminated in the server
itself (gunicorn --certfile) the socket cannot be peeked, and behind servers that expose no socket
the wait runs its full course. The job is never cancelled by a hang-up: it stays queued or runs.
"""

from __future__ import annotations

import io
import json
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Response, request, send_file

from personaplex.jobs import Job, JobStatus
from personaplex.params import TEXT_MARKERS
from personaplex.storage import OUTPUT_JSON, OUTPUT_WAV, read_output
from web.errors import ApiError
from web.pubsub import Notice, Waiter, is_final_event, subscription
from web.services import Services, services
from web.submit import accept, job_urls, new_job
from web.validation import parse_upload

log = logging.getLogger(__name__)

bp = Blueprint("offline", __name__, url_prefix="/api")

RECHECK_INTERVAL_S = 5.0
"""Seconds between re-reads of the job record while waiting (a final event whose publish failed)."""

WAIT_SLICE_S = 1.0
"""Seconds between checks that the client is still connected: a hang-up frees the wait within this."""

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before the answer (nginx's convention)."""


@bp.post("/offline")
def offline() -> Response:
    svc = services()
    upload = parse_upload(request.files, request.form, svc.settings.max_audio_seconds)
    job = new_job(upload)
    still_there = client_watch(request.environ)
    with subscription(svc, job.id) as waiter:
        accept(svc, upload, job)
        job = wait_final(svc, waiter, job.id, svc.settings.offline_timeout, still_there)
    if not job.status.is_final and not still_there():
        log.info("The client of job %s hung up; the job stays %s.", job.id, job.status.value)
        return Response(status=CLIENT_CLOSED_REQUEST)  # nobody reads it; the access log shows it
    return offline_response(svc, job)


def wait_final(
    svc: Services,
    waiter: Waiter,
    job_id: str,
    timeout: float,
    still_there: Callable[[], bool] = lambda: True,
) -> Job:
    """The job once final, or as it stands when `timeout` seconds have passed or the client left.

    Redis outages are waited out: no re-read while the events subscription is down, one as soon as
    it is back (events published in between are lost).
    """
    deadline = time.monotonic() + timeout
    next_read = time.monotonic() + RECHECK_INTERVAL_S
    lost = False
    while (remaining := deadline - time.monotonic()) > 0 and still_there():
        item = waiter.get(min(remaining, WAIT_SLICE_S))
        lost = item is Notice.LOST or (lost and item is not Notice.RESUMED)
        due = time.monotonic() >= next_read and not lost
        if is_final_event(item) or item is Notice.RESUMED or due:
            next_read = time.monotonic() + RECHECK_INTERVAL_S
            job = svc.jobs.get(job_id)
            if job is None or job.status.is_final:
                break
    job = svc.jobs.get(job_id)
    if job is None:
        raise ApiError(500, f"Job {job_id} vanished while waiting.", job_id=job_id)
    return job


def client_watch(environ: Mapping[str, Any]) -> Callable[[], bool]:
    """A check that the request's client is still connected (always True where none is possible)."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return lambda: True  # TLS records cannot be peeked at; other servers expose no socket
    return lambda: not client_left(sock)


def client_left(sock: socket.socket) -> bool:
    """True once the peer closed or reset the connection, without consuming a byte.

    A selector, not select(): descriptors past 1024 are common with hundreds of sockets open, and
    under gevent both are the cooperative versions.
    """
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            if not selector.select(0):
                return False
        return sock.recv(1, socket.MSG_PEEK) == b""  # readable and empty: end of stream
    except ConnectionError:
        return True
    except (OSError, ValueError):
        return sock.fileno() < 0  # closed under us: gone; anything else: cannot tell, keep waiting


def offline_response(svc: Services, job: Job) -> Response:
    if job.status is JobStatus.SUCCEEDED:
        return _wav_response(svc, job)
    if job.status is JobStatus.FAILED:
        raise ApiError(500, f"Processing failed: {job.error}", job_id=job.id)
    if job.status is JobStatus.CANCELLED:
        raise ApiError(409, f"Job {job.id} was cancelled.", job_id=job.id)
    raise ApiError(
        504,
        f"Job {job.id} is still {job.status.value} after {svc.settings.offline_timeout:g} s; it continues: "
        "poll its URL or open its events socket.",
        job_id=job.id,
        status=job.status.value,
        urls=job_urls(job.id),
    )


def _wav_response(svc: Services, job: Job) -> Response:
    document = json.loads(read_output(svc.blobs, job, OUTPUT_JSON))
    response = send_file(
        io.BytesIO(read_output(svc.blobs, job, OUTPUT_WAV)),
        mimetype="audio/wav",
        download_name="output.wav",
        max_age=0,
    )
    response.headers["X-Text-Output"] = text_header(document)
    response.headers["X-Job-Id"] = job.id
    return response


def text_header(document: dict[str, Any]) -> str:
    """The generated text pieces as a JSON array, ASCII-only so any HTTP stack can carry it."""
    frames = document.get("frames") or []
    pieces = [piece for piece in frames if piece not in TEXT_MARKERS]
    return json.dumps(pieces, ensure_ascii=True)
