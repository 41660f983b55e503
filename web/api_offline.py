"""POST /api/offline: the seed's synchronous call, now a queued job with a bounded wait.

Same fields as POST /api/jobs. It subscribes to the job's events before enqueueing, waits up to
`offline_timeout` seconds for a final event, and answers with the WAV and an `X-Text-Output` header
(a JSON array of the generated text pieces, ASCII-escaped). If the wait runs out: 504 with the job id,
and the job goes on; poll it at its URL.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from flask import Blueprint, Response, request, send_file
from redis.client import PubSub

from personaplex.jobs import Job, JobStatus
from personaplex.params import TEXT_MARKERS
from personaplex.storage import OUTPUT_JSON, OUTPUT_WAV, read_output
from web.errors import ApiError
from web.pubsub import is_final_event, next_event, subscription
from web.services import Services, services
from web.submit import accept, job_urls, new_job
from web.validation import parse_upload

bp = Blueprint("offline", __name__, url_prefix="/api")

RECHECK_INTERVAL_S = 5.0
"""Seconds between re-reads of the job record while waiting (pub/sub drops events if Redis restarts)."""


@bp.post("/offline")
def offline() -> Response:
    svc = services()
    upload = parse_upload(request.files, request.form, svc.settings.max_audio_seconds)
    job = new_job(upload)
    with subscription(svc, job.id) as pubsub:
        accept(svc, upload, job)
        job = wait_final(svc, pubsub, job.id, svc.settings.offline_timeout)
    return offline_response(svc, job)


def wait_final(svc: Services, pubsub: PubSub, job_id: str, timeout: float) -> Job:
    """The job once final, or as it stands when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        event = next_event(pubsub, min(remaining, RECHECK_INTERVAL_S))
        if event is None or is_final_event(event):
            job = svc.jobs.get(job_id)
            if job is None or job.status.is_final:
                break
    job = svc.jobs.get(job_id)
    if job is None:
        raise ApiError(500, f"Job {job_id} vanished while waiting.", job_id=job_id)
    return job


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
