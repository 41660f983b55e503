"""Batch records in Redis: which jobs were submitted together, under which input names.

A batch is one JSON string `personaplex:batch:<id>` holding its creation time and its inputs in
submission order, each an input name and a job id. The jobs themselves stay ordinary job records
(`Job.batch_id` points back), so workers know nothing of batches.

Retention: the record gets a TTL of `retention_s` when it is created, and `keep_alive()` renews it
while any of its jobs is still active, so a batch outlives its last job by at least the retention
time, like the jobs' own records.

`output_stems(names)` is the one rule for naming outputs: the archive and the CLI both use it;
`unique_names` renames repeated input names the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePath

import redis

from personaplex.jobs import Keys, check_job_id, is_valid_job_id, new_job_id

new_batch_id = new_job_id
"""Batch ids look like job ids (uuid4 hex)."""


@dataclass(frozen=True)
class BatchInput:
    """One input of a batch: its (unique, sanitized) name and its job."""

    name: str
    job_id: str


@dataclass
class Batch:
    id: str = field(default_factory=new_batch_id)
    created_at: float = field(default_factory=time.time)
    inputs: list[BatchInput] = field(default_factory=list)
    owner: str | None = None  # the name of the API key that made it; None: made without keys

    @property
    def job_ids(self) -> list[str]:
        return [item.job_id for item in self.inputs]

    def to_json(self) -> str:
        inputs = [[item.name, item.job_id] for item in self.inputs]
        return json.dumps(
            {"id": self.id, "created_at": self.created_at, "inputs": inputs, "owner": self.owner}
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Batch:
        data = json.loads(raw)
        inputs = [BatchInput(name, job_id) for name, job_id in data["inputs"]]
        # Records written before owners existed have none: only admin keys see them.
        return cls(id=data["id"], created_at=data["created_at"], inputs=inputs, owner=data.get("owner"))


class BatchKeys:
    """Redis keys of batch records, built from a validated id."""

    PREFIX = Keys.PREFIX + "batch:"

    @classmethod
    def key_for(cls, batch_id: str) -> str:
        return cls.PREFIX + check_job_id(batch_id)


class BatchStore:
    """Creates and reads batch records; `retention_s` is their TTL (seconds)."""

    def __init__(self, redis_client: redis.Redis, retention_s: float = 24 * 3600.0) -> None:
        self.redis = redis_client
        self.retention_s = retention_s

    @property
    def _ttl(self) -> int:
        return max(int(self.retention_s), 1)

    def create(self, batch: Batch) -> Batch:
        for job_id in batch.job_ids:
            check_job_id(job_id)
        self.redis.set(BatchKeys.key_for(batch.id), batch.to_json(), ex=self._ttl)
        return batch

    def get(self, batch_id: str) -> Batch | None:
        """The batch, or None if the id is malformed, unknown or expired."""
        if not is_valid_job_id(batch_id):
            return None
        raw = self.redis.get(BatchKeys.key_for(batch_id))
        return Batch.from_json(raw) if raw is not None else None

    def keep_alive(self, batch_id: str) -> bool:
        """Restart the record's TTL (call while its jobs are active); False if it is gone."""
        return bool(self.redis.expire(BatchKeys.key_for(batch_id), self._ttl))

    def delete(self, batch_id: str) -> None:
        self.redis.delete(BatchKeys.key_for(batch_id))


def output_stems(names: Iterable[str]) -> list[str]:
    """The output file stem of each input name, unique in order: "a.wav", "a.flac" -> "a", "a-2".

    An input keeps its own stem unless an earlier one took it (ignoring case, for case-insensitive
    file systems); then it gets the first free "<stem>-<n>" (n = 2, 3, ...). The same names in the
    same order always give the same stems.
    """
    return _unique((PurePath(name).stem or "input", "") for name in names)


def unique_names(names: Iterable[str]) -> list[str]:
    """The names with repeats renamed the same way: "a.wav", "a.wav" -> "a.wav", "a-2.wav"."""
    return _unique((PurePath(name).stem, PurePath(name).suffix) for name in names)


def _unique(parts: Iterable[tuple[str, str]]) -> list[str]:
    taken: set[str] = set()
    unique: list[str] = []
    for stem, suffix in parts:
        candidate, n = stem + suffix, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        unique.append(candidate)
    return unique
