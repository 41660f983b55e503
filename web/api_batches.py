"""The batch resource: many inputs in one request, their status together, one zip of the outputs.

    POST   /api/batches               files (repeated) and/or a zip -> 202 {batch_id, jobs: {name: id}}
    GET    /api/batches/<id>          counts by state and each job's status
    GET    /api/batches/<id>/archive  a zip of <stem>.wav and <stem>.json per input (409 until all final)
    DELETE /api/batches/<id>          cancel every job that has not finished

Everything is validated before anything is queued: one bad file or parameter answers 400 naming it,
and no job exists afterwards. A zip may hold audio files in folders; folders, `__MACOSX/` and hidden
files (`.DS_Store`) are skipped; an absolute path, `..`, a link, an encrypted member or a file that is
not audio refuses the whole batch.

The archive is reproducible: its members all carry the fixed time ARCHIVE_DATE_TIME (1980-01-01), so
downloading it again gives the same bytes, and the WAVs of equal inputs and seeds are equal members.
"""

from __future__ import annotations

import io
import json
import logging
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from werkzeug.datastructures import FileStorage, MultiDict

from personaplex.batches import Batch, BatchInput, output_stems, unique_names
from personaplex.jobs import Job, JobStatus
from personaplex.storage import OUTPUT_JSON, OUTPUT_WAV, read_output
from web import schemas
from web.api_jobs import revoke_quietly
from web.auth import current_owner, current_principal
from web.errors import ApiError
from web.schemas import EXPIRED, PARAM_FIELDS, answer
from web.services import Services, services
from web.submit import check_capacity, enqueue, job_urls, new_job, store_jobs
from web.validation import Upload, check_audio, parse_params, safe_input_name

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/api/batches")

MAX_BATCH_FILES = 500
"""Most inputs one batch may hold (files plus zip members)."""

MANIFEST_NAME = "_batch.json"
"""The archive's index of every input; no output stem can start with "_" (names are sanitized)."""


_SKIPPED_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class Received:
    """One input as it arrived: the name it was sent under and its bytes."""

    sent_as: str
    data: bytes


# -- views -----------------------------------------------------------------------------------------


@bp.post("")
def submit_batch() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    received = collect_inputs(request.files, svc.settings.max_upload_bytes)
    uploads = validate(received, request.form, svc.settings.max_audio_seconds)
    check_capacity(svc, incoming=len(uploads))
    batch = queue_batch(svc, uploads)
    urls = batch_urls(batch.id)
    body = {
        "batch_id": batch.id,
        "count": len(batch.inputs),
        "jobs": {item.name: item.job_id for item in batch.inputs},
        "inputs": [
            {"name": item.name, "filename": got.sent_as, "job_id": item.job_id}
            for item, got in zip(batch.inputs, received, strict=True)
        ],
        "urls": urls,
    }
    return jsonify(answer(schemas.BatchAccepted, body)), 202, {"Location": urls["self"]}


@bp.get("/<batch_id>")
def get_batch(batch_id: str) -> Response:
    svc = services()
    batch = load_batch(svc, batch_id)
    view = batch_view(batch, job_map(svc, batch))
    if not view["finished"]:
        svc.batches.keep_alive(batch.id)
    return jsonify(answer(schemas.Batch, view))


@bp.get("/<batch_id>/archive")
def get_archive(batch_id: str) -> Response:
    """409 while any job is queued or running; then the outputs of every job that succeeded.

    Inputs without outputs (failed, cancelled, expired) are listed in `_batch.json` in the zip and
    counted in the X-Missing-Outputs header.
    """
    svc = services()
    batch = load_batch(svc, batch_id)
    jobs = job_map(svc, batch)
    view = batch_view(batch, jobs)
    if not view["finished"]:
        active = view["counts"][JobStatus.QUEUED] + view["counts"][JobStatus.RUNNING]
        raise ApiError(
            409,
            f"Batch {batch.id} has {active} unfinished jobs; the archive is ready when all are final.",
            counts=view["counts"],
        )
    missing = sum(1 for entry in view["jobs"] if entry["status"] != JobStatus.SUCCEEDED)
    return Response(
        _zip_stream(_archive_entries(svc, batch.id, view["jobs"])),
        mimetype="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="batch-{batch.id}.zip"',
            "X-Missing-Outputs": str(missing),
        },
    )


@bp.delete("/<batch_id>")
def cancel_batch(batch_id: str) -> tuple[Response, int]:
    """Cancel the queued jobs now and ask the running ones to stop (200, or 202 while any stops)."""
    svc = services()
    batch = load_batch(svc, batch_id)
    active = [job for job in job_map(svc, batch).values() if not job.status.is_final]
    if not active:
        raise ApiError(409, f"Batch {batch.id} has nothing left to cancel: every job is final.")
    cancelled: list[str] = []
    stopping = 0
    for job in active:
        after = svc.jobs.request_cancel(job.id)
        if after is not None and after.status is JobStatus.CANCELLED:
            cancelled.append(job.id)
        elif after is not None and not after.status.is_final:
            stopping += 1
    revoke_quietly(svc, cancelled)
    view = batch_view(batch, job_map(svc, batch))
    body = {**view, "cancelled": len(cancelled), "cancel_requested": stopping}
    return jsonify(answer(schemas.Batch, body)), 202 if stopping else 200


# -- reading the request -------------------------------------------------------------------------


@dataclass
class _Budget:
    """What one request may still expand to: bytes and inputs, shared by every zip in it."""

    bytes_left: int
    inputs_left: int = MAX_BATCH_FILES

    def take(self, inputs: int, size: int, where: str) -> None:
        self.inputs_left -= inputs
        self.bytes_left -= size
        if self.inputs_left < 0:
            raise ApiError(400, f"{where}: the batch has more than {MAX_BATCH_FILES} inputs, the limit.")
        if self.bytes_left < 0:
            raise ApiError(
                400, f"{where}: the batch expands past the upload limit (PERSONAPLEX_MAX_UPLOAD_MB)."
            )


def collect_inputs(files: MultiDict[str, FileStorage], max_bytes: int) -> list[Received]:
    """Every input of the request: repeated `files` fields (a zip among them is expanded) and `archive`.

    One budget covers the whole request, so many small zips cannot expand past the upload limit.
    """
    received: list[Received] = []
    budget = _Budget(bytes_left=max_bytes)
    for field_name in ("files", "archive"):
        for storage in files.getlist(field_name):
            data = storage.read()
            sent_as = storage.filename or ""
            if _is_zip(data):
                received.extend(_zip_members(sent_as or "archive.zip", data, budget))
            elif field_name == "archive":
                raise ApiError(400, f"The archive {sent_as[:128]!r} is not a zip file.", file=sent_as)
            else:
                budget.take(1, len(data), sent_as[:128] or "upload")
                received.append(Received(sent_as, data))
    if not received:
        raise ApiError(
            400,
            "No audio uploaded: send files as the repeated multipart field 'files', or a zip as 'archive'.",
        )
    return received


def _is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _zip_members(archive_name: str, data: bytes, budget: _Budget) -> list[Received]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ApiError(400, f"{archive_name}: not a readable zip ({exc}).", file=archive_name) from None
    with archive:
        members = [info for info in archive.infolist() if not _skipped(info)]
        for info in members:
            _check_member(archive_name, info)
        # Declared sizes first (cheap, before any inflating), then the real ones while reading.
        budget.take(len(members), 0, archive_name)
        if sum(info.file_size for info in members) > budget.bytes_left:
            raise ApiError(400, f"{archive_name} expands past the upload limit (PERSONAPLEX_MAX_UPLOAD_MB).")
        received = []
        for info in members:
            content = _read_member(archive_name, archive, info, budget.bytes_left)
            budget.take(0, len(content), archive_name)
            received.append(Received(info.filename, content))
        return received


def _skipped(info: zipfile.ZipInfo) -> bool:
    """Folders and the junk archivers add: macOS resource forks and hidden files."""
    name = info.filename.replace("\\", "/")
    return info.is_dir() or name.startswith(_SKIPPED_PREFIXES) or PurePosixPath(name).name.startswith(".")


def _check_member(archive_name: str, info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    reason = None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        reason = "has an absolute path"
    elif ".." in PurePosixPath(name).parts:
        reason = "climbs out of the archive with '..'"
    elif stat.S_ISLNK(info.external_attr >> 16):
        reason = "is a symbolic link"
    elif info.flag_bits & 0x1:
        reason = "is encrypted"
    if reason is not None:
        raise ApiError(400, f"{archive_name}: member {info.filename[:128]!r} {reason}.", file=info.filename)


def _read_member(archive_name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """The member's bytes, reading no more than `budget` (declared sizes can lie)."""
    try:
        with archive.open(info) as member:
            content = member.read(budget + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as exc:
        raise ApiError(400, f"{archive_name}: cannot read {info.filename[:128]!r} ({exc}).") from None
    if len(content) > budget:
        raise ApiError(400, f"{archive_name} expands past the upload limit (PERSONAPLEX_MAX_UPLOAD_MB).")
    return content


def validate(received: list[Received], form: MultiDict[str, str], max_audio_seconds: float) -> list[Upload]:
    """Check every input and its parameters; the first problem answers 400 naming the input."""
    parse_params(form)  # shared parameters: fail once, not once per file
    per_file = _parse_per_file(form.get("per_file"))
    names = unique_names(safe_input_name(got.sent_as) for got in received)
    unknown = set(per_file) - {got.sent_as for got in received} - set(names)
    if unknown:
        listed = ", ".join(sorted(repr(n[:64]) for n in unknown))
        raise ApiError(400, f"per_file names inputs that are not in the batch: {listed}.")
    uploads = []
    for got, name in zip(received, names, strict=True):
        overrides = per_file.get(got.sent_as, per_file.get(name, {}))
        try:
            info = check_audio(got.data, max_audio_seconds)
            params = parse_params(_merge(form, overrides))
        except ApiError as exc:
            raise ApiError(
                400, f"{got.sent_as or name}: {exc.message}", file=got.sent_as, **exc.extra
            ) from exc
        uploads.append(Upload(data=got.data, input_name=name, info=info, params=params))
    return uploads


def _parse_per_file(raw: str | None) -> dict[str, dict[str, Any]]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"per_file is not valid JSON ({exc}).") from None
    except RecursionError:  # the parser recurses per bracket: 100,000 of them exhaust the stack
        raise ApiError(400, "per_file is nested too deeply to be a JSON object of objects.") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ApiError(400, 'per_file must be a JSON object of objects: {"name.wav": {"seed": 1}}.')
    for name, params in value.items():
        extra = set(params) - set(PARAM_FIELDS)
        if extra:
            raise ApiError(
                400,
                f"per_file[{name[:64]!r}] has unknown parameters {sorted(extra)}; "
                f"use {', '.join(PARAM_FIELDS)}.",
            )
    return value


def _merge(form: MultiDict[str, str], overrides: dict[str, Any]) -> MultiDict[str, str]:
    merged = MultiDict(form)
    for key, value in overrides.items():
        merged.setlist(key, [_form_text(value)])
    return merged


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


# -- queueing -------------------------------------------------------------------------------------


def queue_batch(svc: Services, uploads: list[Upload]) -> Batch:
    """Record the batch, then store and enqueue each job; if one fails, cancel those already queued."""
    batch = Batch(owner=current_owner())
    jobs: list[Job] = []
    for upload in uploads:
        job = new_job(upload)
        job.batch_id = batch.id
        jobs.append(job)
    batch.inputs = [BatchInput(u.input_name, j.id) for u, j in zip(uploads, jobs, strict=True)]
    svc.batches.create(batch)
    try:
        store_jobs(svc, jobs, uploads)
    except Exception:
        svc.batches.delete(batch.id)
        raise
    queued: list[str] = []
    try:
        for job in jobs:
            enqueue(svc, job.id)
            queued.append(job.id)
    except Exception:
        # Every record exists, but not every message: cancel them all (a queued job without a
        # message would wait forever) and drop the messages already sent.
        log.error("Batch %s failed after %d of %d jobs; cancelling them", batch.id, len(queued), len(jobs))
        try:
            for job in jobs:
                svc.jobs.request_cancel(job.id)
            svc.batches.delete(batch.id)
        except Exception as exc:  # Redis itself is down: the client's error says so already
            log.error("Could not cancel the jobs of batch %s: %s", batch.id, exc)
        revoke_quietly(svc, queued)
        raise
    return batch


# -- reading batches ------------------------------------------------------------------------------


def load_batch(svc: Services, batch_id: str) -> Batch:
    batch = svc.batches.get(batch_id)
    if batch is None or not current_principal().can_see(batch.owner):  # another client's: not found
        raise ApiError(404, f"Batch {batch_id[:64]!r} doesn't exist (or has expired).")
    return batch


def job_map(svc: Services, batch: Batch) -> dict[str, Job]:
    return {job.id: job for job in svc.jobs.get_many(batch.job_ids)}


def batch_urls(batch_id: str) -> dict[str, str]:
    return {
        "self": url_for("batches.get_batch", batch_id=batch_id),
        "archive": url_for("batches.get_archive", batch_id=batch_id),
    }


def batch_view(batch: Batch, jobs: dict[str, Job]) -> dict[str, Any]:
    """Counts by state and one entry per input, in submission order."""
    counts = dict.fromkeys([*(s.value for s in JobStatus), EXPIRED], 0)
    entries = []
    stems = output_stems(item.name for item in batch.inputs)
    for item, stem in zip(batch.inputs, stems, strict=True):
        job = jobs.get(item.job_id)
        status = job.status.value if job is not None else EXPIRED
        counts[status] += 1
        entries.append({"name": item.name, "output": stem, "job_id": item.job_id, **_job_summary(job)})
    active = counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING]
    return {
        "batch_id": batch.id,
        "created_at": batch.created_at,
        "total": len(batch.inputs),
        "finished": active == 0,
        "counts": counts,
        "jobs": entries,
        "urls": batch_urls(batch.id),
    }


def _job_summary(job: Job | None) -> dict[str, Any]:
    if job is None:
        return {"status": EXPIRED, "progress": {}, "error": "The job record has expired."}
    return {
        "status": job.status.value,
        "progress": job.progress,
        "error": job.error,
        "worker": job.worker,
        "attempts": job.attempts,
        "input_duration_s": job.input_duration_s,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "urls": job_urls(job.id),
    }


# -- the archive ----------------------------------------------------------------------------------


def _archive_entries(
    svc: Services, batch_id: str, entries: list[dict[str, Any]]
) -> Iterator[tuple[str, bytes]]:
    """(name in the zip, bytes) per output, read one job at a time; the manifest comes last."""
    blobs = svc.blobs
    manifest = []
    for entry in entries:
        record = {k: entry[k] for k in ("name", "job_id", "status")}
        job = svc.jobs.get(entry["job_id"]) if entry["status"] == JobStatus.SUCCEEDED else None
        if job is not None:  # read again: the record names the attempt whose outputs count
            try:
                wav = read_output(blobs, job, OUTPUT_WAV)
                text = json.loads(read_output(blobs, job, OUTPUT_JSON))
            except FileNotFoundError:
                record["error"] = "The outputs are gone (retention ended)."
            else:
                files = [f"{entry['output']}.wav", f"{entry['output']}.json"]
                yield files[0], wav
                yield files[1], json.dumps({"job_id": entry["job_id"], **text}, ensure_ascii=False).encode()
                record["files"] = files
        else:
            record["error"] = entry.get("error") or f"The job was {entry['status']}."
        manifest.append(record)
    yield MANIFEST_NAME, json.dumps({"batch_id": batch_id, "inputs": manifest}, indent=1).encode()


class _Sink:
    """A write-only stream zipfile writes into; `take()` hands over what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


ARCHIVE_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""The modification time of every archive member: the zip format's earliest date, a fixed value.

A clock time would make the same outputs a different zip on each download. The jobs' finish times
would be fixed too, but a zip stores local time without a zone, so they would still depend on the
web server's TZ, and two batches of the same inputs would differ in every member header."""


def _member(name: str) -> zipfile.ZipInfo:
    """The header of one archive member: fixed time and permissions, WAVs stored, JSON deflated."""
    info = zipfile.ZipInfo(name, date_time=ARCHIVE_DATE_TIME)
    info.external_attr = 0o600 << 16  # what writestr(name) gives, kept for existing users
    info.compress_type = zipfile.ZIP_STORED if name.endswith(".wav") else zipfile.ZIP_DEFLATED
    return info


def _zip_stream(entries: Iterator[tuple[str, bytes]]) -> Iterator[bytes]:
    """A zip written as it is sent; the same outputs always give the same bytes."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w") as archive:  # type: ignore[arg-type]
        for name, data in entries:
            archive.writestr(_member(name), data)
            yield sink.take()
    yield sink.take()
