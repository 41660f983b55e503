"""Accepting a job: check the queue, store the input and the record, then enqueue.

Order matters so nothing accepted is lost: the blob and the job record are written before the task is
sent; if sending fails, the job is marked failed with the reason and the client gets 503. A queued
record enters an outbox as it is written and leaves it once its message is sent: if this process dies
in between, a worker's housekeeping sends the message after `PERSONAPLEX_DISPATCH_GRACE_S`.
"""

from __future__ import annotations

import logging
import math

from flask import url_for

from personaplex.jobs import Job, QueueFullError
from personaplex.storage import INPUT
from web.auth import current_owner
from web.errors import ApiError
from web.services import Services
from web.validation import Upload
from worker.control import send_job

log = logging.getLogger(__name__)

PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
"""How hard Celery tries to publish before the enqueue counts as failed (about half a second)."""

RETRY_AFTER_PER_JOB_S = 5
"""Rough seconds per queued job, to suggest a Retry-After when the queue is full."""


def check_capacity(svc: Services, incoming: int = 1) -> None:
    """429 with Retry-After when the queue has no room for `incoming` more jobs.

    An early answer, before any blob is stored; `store_jobs` checks again as it writes the jobs.
    """
    queued = svc.jobs.queue_length()
    if queued + incoming > svc.settings.max_queue:
        raise queue_full(QueueFullError(queued, incoming, svc.settings.max_queue))


def queue_full(full: QueueFullError) -> ApiError:
    """The 429 for a full queue, with a Retry-After that grows with the overflow."""
    overflow = full.queued + full.incoming - full.limit
    retry_after = max(1, min(3600, math.ceil(RETRY_AFTER_PER_JOB_S * overflow)))
    sent = f"; {full.incoming} jobs were sent" if full.incoming > 1 else ""
    return ApiError(
        429,
        f"The queue is full ({full.queued} jobs waiting, limit {full.limit}{sent}); retry later.",
        headers={"Retry-After": str(retry_after)},
        queue_length=full.queued,
    )


def store_jobs(svc: Services, jobs: list[Job], uploads: list[Upload]) -> None:
    """Store the inputs, then write the queued records at once if the queue has room (429 if not).

    Either every job is written or none is, and a refused job's input is deleted again: also the
    one whose write failed (a full disk leaves its folder behind), before errors.py answers 507.
    """
    stored: list[str] = []
    try:
        for job, upload in zip(jobs, uploads, strict=True):
            stored.append(job.id)
            svc.blobs.put(job.id, INPUT, upload.data)
        svc.jobs.create_many(jobs, svc.settings.max_queue)
    except Exception as exc:
        for job_id in stored:  # no record was written: the client gets an error, nothing is orphaned
            svc.blobs.delete(job_id)
        if isinstance(exc, QueueFullError):
            raise queue_full(exc) from exc
        raise
    _cleanup_quietly(svc)


def new_job(upload: Upload) -> Job:
    """The queued job record for a validated upload (not stored yet), owned by the request's key."""
    return Job(
        params=upload.params.to_dict(),
        input_name=upload.input_name,
        input_duration_s=round(upload.info.duration_s, 3),
        owner=current_owner(),
    )


def accept(svc: Services, upload: Upload, job: Job | None = None) -> Job:
    """Store and enqueue a validated upload (as `job` if given); returns the queued job."""
    check_capacity(svc)
    job = job or new_job(upload)
    store_jobs(svc, [job], [upload])
    enqueue(svc, job.id)
    return job


def enqueue(svc: Services, job_id: str) -> None:
    """Send the job's message, then take it off the outbox (if this process dies in between, a
    worker's sweeper sends it after `dispatch_grace_s`: a second message for a job is harmless)."""
    try:
        send_job(svc.celery, job_id, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    except Exception as exc:  # kombu raises many types when the broker is down
        log.error("Could not enqueue job %s: %s", job_id, exc)
        reason = f"Could not enqueue the job: the broker is unreachable ({exc})."
        _mark_failed_quietly(svc, job_id, reason)
        raise ApiError(503, reason, job_id=job_id) from exc
    try:
        svc.jobs.mark_dispatched(job_id)
    except Exception as exc:  # the sweeper sends the message again after the grace: harmless
        log.warning("Job %s was sent but is still in the outbox: %s", job_id, exc)


def _mark_failed_quietly(svc: Services, job_id: str, reason: str) -> None:
    try:
        svc.jobs.mark_failed(job_id, reason)
    except Exception as exc:
        log.error("Could not mark job %s failed: %s", job_id, exc)


def _cleanup_quietly(svc: Services) -> None:
    try:
        svc.maybe_cleanup()
    except Exception as exc:
        log.warning("Cleanup of expired jobs failed: %s", exc)


def job_urls(job_id: str) -> dict[str, str]:
    """Where a client finds the job, its outputs and its event stream."""
    base = url_for("jobs.get_job", job_id=job_id)
    return {
        "self": base,
        "audio": url_for("jobs.get_audio", job_id=job_id),
        "text": url_for("jobs.get_text", job_id=job_id),
        "input": url_for("jobs.get_input", job_id=job_id),
        "events": f"{base}/events",  # a WebSocket (url_for would give an absolute ws:// URL)
    }
