"""The job resource: submit, list, read, download outputs, cancel."""

from __future__ import annotations

import io
import json
import logging
import mimetypes
from pathlib import PurePath
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file

from personaplex.jobs import Job, JobStatus
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, read_output
from web import schemas
from web.auth import current_principal
from web.errors import ApiError
from web.schemas import answer
from web.services import Services, services
from web.submit import accept, job_urls
from web.validation import parse_upload

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/api/jobs")

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500


def load_job(svc: Services, job_id: str) -> Job:
    """The job, or 404 (a malformed id, and another client's job, are simply not found)."""
    job = svc.jobs.get(job_id)
    if job is None or not current_principal().can_see(job.owner):
        raise ApiError(404, f"Job {job_id[:64]!r} doesn't exist (or has expired).")
    return job


def job_view(job: Job) -> dict[str, Any]:
    """The job as clients see it (checked against schemas.Job by the body that holds it)."""
    return {**job.to_dict(), "job_id": job.id, "urls": job_urls(job.id)}


@bp.post("")
def submit_job() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    upload = parse_upload(request.files, request.form, svc.settings.max_audio_seconds)
    job = accept(svc, upload)
    urls = job_urls(job.id)
    body = {"job_id": job.id, "status": job.status, "urls": urls, "job": job_view(job)}
    return jsonify(answer(schemas.JobAccepted, body)), 202, {"Location": urls["self"]}


@bp.get("")
def list_jobs() -> Response:
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in JobStatus}:
        valid = ", ".join(s.value for s in JobStatus)
        raise ApiError(400, f"Unknown status {status[:32]!r}; use one of {valid}.")
    limit = _parse_limit(request.args.get("limit"))
    owner = current_principal().owner_filter  # a client key lists its own jobs, an admin key all
    jobs = services().jobs.list_recent(status=status, limit=limit, owner=owner)
    return jsonify(answer(schemas.JobList, {"jobs": [job_view(job) for job in jobs], "count": len(jobs)}))


def _parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIST_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw[:32]!r}.") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIST_LIMIT}.")
    return limit


@bp.get("/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(answer(schemas.Job, job_view(load_job(services(), job_id))))


def _require_output(svc: Services, job_id: str, name: str) -> tuple[Job, bytes]:
    job = load_job(svc, job_id)
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409,
            f"Job {job_id} is {job.status.value}; its output exists only once it has succeeded.",
            status=job.status.value,
        )
    try:
        return job, read_output(svc.blobs, job, name)
    except FileNotFoundError:
        raise ApiError(410, f"The output of job {job_id} is gone (retention ended).") from None


@bp.get("/<job_id>/audio")
def get_audio(job_id: str) -> Response:
    job, data = _require_output(services(), job_id, OUTPUT_WAV)
    name = f"{PurePath(job.input_name).stem or 'output'}_personaplex.wav"
    return send_file(io.BytesIO(data), mimetype="audio/wav", download_name=name, max_age=0)


@bp.get("/<job_id>/input")
def get_input(job_id: str) -> Response:
    """The upload as it was sent, while the job is kept (the console draws it beside the reply)."""
    svc = services()
    job = load_job(svc, job_id)
    try:
        data = svc.blobs.get(job.id, INPUT)
    except FileNotFoundError:
        raise ApiError(410, f"The input of job {job_id} is gone (retention ended).") from None
    mimetype = mimetypes.guess_type(job.input_name)[0] or "application/octet-stream"
    return send_file(io.BytesIO(data), mimetype=mimetype, download_name=job.input_name, max_age=0)


@bp.get("/<job_id>/text")
def get_text(job_id: str) -> Response:
    _, data = _require_output(services(), job_id, OUTPUT_JSON)
    return jsonify(answer(schemas.TextOutput, {"job_id": job_id, **json.loads(data)}))


@bp.delete("/<job_id>")
def cancel_job(job_id: str) -> tuple[Response, int]:
    svc = services()
    job = load_job(svc, job_id)
    if job.status.is_final:
        raise ApiError(409, f"Job {job_id} is already {job.status.value}.", status=job.status.value)
    job = svc.jobs.request_cancel(job_id) or job
    if job.status is JobStatus.CANCELLED:
        revoke_quietly(svc, [job_id])
        return jsonify(answer(schemas.CancelledJob, {**job_view(job), "cancel_requested": True})), 200
    message = (
        "The job stops at its worker's next check: before its next frame, or its next decode chunk. "
        "One already writing its outputs when the check comes finishes as succeeded."
    )
    body = {**job_view(job), "cancel_requested": True, "message": message}
    return jsonify(answer(schemas.CancelledJob, body)), 202


def revoke_quietly(svc: Services, job_ids: list[str]) -> None:
    """Tell workers to drop the queued messages (one broadcast); workers also skip cancelled jobs."""
    if not job_ids:
        return
    try:
        svc.celery.control.revoke(job_ids)
    except Exception as exc:  # the record already says cancelled: a lost revoke costs a no-op delivery
        log.warning("Could not revoke jobs %s: %s", ", ".join(job_ids), exc)
