"""Blob storage keyed by job id: audio never rides in a Celery message, only the id does.

Two stores with one interface. `FsBlobStore` keeps files under `<root>/jobs/<id>/` on a directory web
and workers share (a docker volume or NFS); `RedisBlobStore` keeps them as Redis strings with the
retention TTL, for workers on hosts that share no filesystem. Job ids and blob names are validated
before any path or key is built, so a hostile id or name can never escape the store.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import redis

from personaplex.audio import write_bytes_atomic
from personaplex.jobs import JobStore, Keys, check_job_id

if TYPE_CHECKING:
    from personaplex.settings import Settings

INPUT = "input"
OUTPUT_WAV = "output.wav"
OUTPUT_JSON = "output.json"
OUTPUT_NAMES = (OUTPUT_WAV, OUTPUT_JSON)
BLOB_NAMES = (INPUT, *OUTPUT_NAMES)
"""Every blob a job has: the only names web and worker write."""


def check_blob_name(name: str) -> str:
    """Return the name if it is one of BLOB_NAMES (so no path or key can be built from anything else)."""
    if name not in BLOB_NAMES:
        raise ValueError(f"Invalid blob name {name!r}: expected one of {', '.join(BLOB_NAMES)}")
    return name


class BlobStore(Protocol):
    """What web and worker need from a blob store; names are INPUT, OUTPUT_WAV and OUTPUT_JSON."""

    def put(self, job_id: str, name: str, data: bytes) -> None: ...

    def get(self, job_id: str, name: str) -> bytes:
        """The blob's bytes; raises FileNotFoundError if it is missing."""
        ...

    def exists(self, job_id: str, name: str) -> bool: ...

    def delete(self, job_id: str) -> None:
        """Remove every blob of the job; a job with none is fine."""
        ...


class FsBlobStore:
    """Files under `<root>/jobs/<id>/<name>`, written atomically so readers never see half a file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / check_job_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        return self.job_dir(job_id) / check_blob_name(name)

    def put(self, job_id: str, name: str, data: bytes) -> None:
        write_bytes_atomic(self.path(job_id, name), data)

    def get(self, job_id: str, name: str) -> bytes:
        return self.path(job_id, name).read_bytes()

    def exists(self, job_id: str, name: str) -> bool:
        return self.path(job_id, name).is_file()

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


class RedisBlobStore:
    """Redis strings `personaplex:blob:<id>:<name>` that expire after `ttl_s` (the retention time).

    Redis caps a string at 512 MB; uploads are limited far below that (PERSONAPLEX_MAX_UPLOAD_MB).
    """

    def __init__(self, redis_client: redis.Redis, ttl_s: float = 24 * 3600.0) -> None:
        self.redis = redis_client
        self.ttl_s = ttl_s

    def _key(self, job_id: str, name: str) -> str:
        return Keys.blob(job_id, check_blob_name(name))

    def put(self, job_id: str, name: str, data: bytes) -> None:
        self.redis.set(self._key(job_id, name), data, ex=max(int(self.ttl_s), 1))

    def get(self, job_id: str, name: str) -> bytes:
        data = self.redis.get(self._key(job_id, name))
        if data is None:
            raise FileNotFoundError(f"No blob {name!r} for job {job_id}")
        return bytes(data)

    def exists(self, job_id: str, name: str) -> bool:
        return bool(self.redis.exists(self._key(job_id, name)))

    def delete(self, job_id: str) -> None:
        # The names are known: deleting them is one command, where a SCAN would walk every key.
        self.redis.delete(*(self._key(job_id, name) for name in BLOB_NAMES))


def open_blob_store(settings: Settings, redis_client: redis.Redis) -> BlobStore:
    """The store `settings.blob_store` names: "fs" under data_dir, or "redis" with the retention TTL."""
    if settings.blob_store == "redis":
        return RedisBlobStore(redis_client, ttl_s=settings.retention_s)
    return FsBlobStore(settings.data_dir)


def outputs_complete(blobs: BlobStore, job_id: str) -> bool:
    """True when both outputs exist: the worker's test for "this job needs no rerun"."""
    return all(blobs.exists(job_id, name) for name in OUTPUT_NAMES)


def delete_expired(jobs: JobStore, blobs: BlobStore, now: float | None = None) -> list[str]:
    """Forget jobs past their retention and delete their blobs; returns the ids removed.

    Web and worker may both run it periodically: each id is handed out once by `expire_old()`.
    """
    expired = jobs.expire_old(now)
    for job_id in expired:
        blobs.delete(job_id)
    return expired
