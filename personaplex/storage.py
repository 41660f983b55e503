"""Blob storage keyed by job id: audio never rides in a Celery message, only the id does.

Two stores with one interface. `FsBlobStore` keeps files under `<root>/jobs/<id>/` on a directory web
and workers share (a docker volume or NFS); `RedisBlobStore` keeps them as Redis strings with the
retention TTL, for workers on hosts that share no filesystem. Job ids and blob names are validated
before any path or key is built, so a hostile id or name can never escape the store.

Outputs are kept per attempt (`attempt=N`): an attempt writes only its own, and the succeeded record
names the attempt whose outputs it reports (`result["attempt"]`, read by `read_output`). A worker that
lost its job's lease while paused may still finish writing, but only into an attempt no record points
to; it cannot overwrite what the attempt that took over committed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import redis

from personaplex.audio import write_bytes_atomic
from personaplex.jobs import Job, JobStore, Keys, check_job_id

if TYPE_CHECKING:
    from personaplex.settings import Settings

INPUT = "input"
OUTPUT_WAV = "output.wav"
OUTPUT_JSON = "output.json"
OUTPUT_NAMES = (OUTPUT_WAV, OUTPUT_JSON)
BLOB_NAMES = (INPUT, *OUTPUT_NAMES)
"""Every blob a job has: the only names web and worker write."""


def check_blob_name(name: str, attempt: int | None = None) -> str:
    """Return the name if it is one of BLOB_NAMES (so no path or key can be built from anything else);
    only outputs belong to an attempt, a positive integer."""
    if name not in BLOB_NAMES:
        raise ValueError(f"Invalid blob name {name!r}: expected one of {', '.join(BLOB_NAMES)}")
    if attempt is not None and (name not in OUTPUT_NAMES or type(attempt) is not int or attempt < 1):
        raise ValueError(f"Invalid attempt {attempt!r} for blob {name!r}")
    return name


class BlobStore(Protocol):
    """What web and worker need from a blob store; names are INPUT, OUTPUT_WAV and OUTPUT_JSON, and
    outputs may belong to an attempt (None: the layout of records that name no attempt)."""

    def put(self, job_id: str, name: str, data: bytes, attempt: int | None = None) -> None: ...

    def get(self, job_id: str, name: str, attempt: int | None = None) -> bytes:
        """The blob's bytes; raises FileNotFoundError if it is missing."""
        ...

    def exists(self, job_id: str, name: str, attempt: int | None = None) -> bool: ...

    def discard_attempt(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's outputs (an attempt that lost its lease); none is fine."""
        ...

    def delete(self, job_id: str) -> None:
        """Remove every blob of the job, every attempt's outputs included; a job with none is fine."""
        ...


class FsBlobStore:
    """Files under `<root>/jobs/<id>/<name>`, written atomically so readers never see half a file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / check_job_id(job_id)

    def path(self, job_id: str, name: str, attempt: int | None = None) -> Path:
        check_blob_name(name, attempt)
        folder = self.job_dir(job_id) if attempt is None else self._attempt_dir(job_id, attempt)
        return folder / name

    def _attempt_dir(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"attempt-{attempt}"

    def put(self, job_id: str, name: str, data: bytes, attempt: int | None = None) -> None:
        write_bytes_atomic(self.path(job_id, name, attempt), data)

    def get(self, job_id: str, name: str, attempt: int | None = None) -> bytes:
        return self.path(job_id, name, attempt).read_bytes()

    def exists(self, job_id: str, name: str, attempt: int | None = None) -> bool:
        return self.path(job_id, name, attempt).is_file()

    def discard_attempt(self, job_id: str, attempt: int) -> None:
        check_blob_name(OUTPUT_WAV, attempt)
        shutil.rmtree(self._attempt_dir(job_id, attempt), ignore_errors=True)

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


class RedisBlobStore:
    """Redis strings `personaplex:blob:<id>:<name>` that expire after `ttl_s` (the retention time).

    Redis caps a string at 512 MB; uploads are limited far below that (PERSONAPLEX_MAX_UPLOAD_MB).
    """

    def __init__(self, redis_client: redis.Redis, ttl_s: float = 24 * 3600.0) -> None:
        self.redis = redis_client
        self.ttl_s = ttl_s

    # An attempt's outputs are fields "<attempt>/<name>" of one hash per job, so deleting a job is
    # one command however many attempts it had, where a SCAN would walk every key.

    def _key(self, job_id: str, name: str) -> str:
        return Keys.blob(job_id, check_blob_name(name))

    def _field(self, name: str, attempt: int) -> str:
        return f"{attempt}/{check_blob_name(name, attempt)}"

    @property
    def _ttl(self) -> int:
        return max(int(self.ttl_s), 1)

    def put(self, job_id: str, name: str, data: bytes, attempt: int | None = None) -> None:
        if attempt is None:
            self.redis.set(self._key(job_id, name), data, ex=self._ttl)
            return
        with self.redis.pipeline() as pipe:
            pipe.hset(Keys.outputs(job_id), self._field(name, attempt), data)
            pipe.expire(Keys.outputs(job_id), self._ttl)
            pipe.execute()

    def get(self, job_id: str, name: str, attempt: int | None = None) -> bytes:
        if attempt is None:
            data = self.redis.get(self._key(job_id, name))
        else:
            data = self.redis.hget(Keys.outputs(job_id), self._field(name, attempt))
        if data is None:
            raise FileNotFoundError(f"No blob {name!r} (attempt {attempt}) for job {job_id}")
        return bytes(data)

    def exists(self, job_id: str, name: str, attempt: int | None = None) -> bool:
        if attempt is None:
            return bool(self.redis.exists(self._key(job_id, name)))
        return bool(self.redis.hexists(Keys.outputs(job_id), self._field(name, attempt)))

    def discard_attempt(self, job_id: str, attempt: int) -> None:
        self.redis.hdel(Keys.outputs(job_id), *(self._field(name, attempt) for name in OUTPUT_NAMES))

    def delete(self, job_id: str) -> None:
        self.redis.delete(*(self._key(job_id, name) for name in BLOB_NAMES), Keys.outputs(job_id))


def open_blob_store(settings: Settings, redis_client: redis.Redis) -> BlobStore:
    """The store `settings.blob_store` names: "fs" under data_dir, or "redis" with the retention TTL."""
    if settings.blob_store == "redis":
        return RedisBlobStore(redis_client, ttl_s=settings.retention_s)
    return FsBlobStore(settings.data_dir)


def outputs_complete(blobs: BlobStore, job_id: str, attempt: int | None = None) -> bool:
    """True when both outputs of the attempt exist (the worker writes the JSON last)."""
    return all(blobs.exists(job_id, name, attempt) for name in OUTPUT_NAMES)


def completed_attempt(blobs: BlobStore, job_id: str, before: int) -> int | None:
    """The latest attempt before `before` that wrote complete outputs but never committed them (its
    worker died in between): the worker's test for "this job needs no rerun"."""
    return next((n for n in range(before - 1, 0, -1) if outputs_complete(blobs, job_id, n)), None)


def output_attempt(job: Job) -> int | None:
    """The attempt whose outputs a succeeded record reports (None: a record from before attempts)."""
    attempt = (job.result or {}).get("attempt")
    return attempt if isinstance(attempt, int) else None


def read_output(blobs: BlobStore, job: Job, name: str) -> bytes:
    """One output of a succeeded job, from the attempt its record committed."""
    return blobs.get(job.id, name, output_attempt(job))


def delete_expired(jobs: JobStore, blobs: BlobStore, now: float | None = None) -> list[str]:
    """Forget jobs past their retention and delete their blobs; returns the ids removed.

    Web and worker may both run it periodically: each id is handed out once by `expire_old()`.
    """
    expired = jobs.expire_old(now)
    for job_id in expired:
        blobs.delete(job_id)
    return expired
