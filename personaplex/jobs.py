"""Job records in Redis: the one source of truth clients read, written by web and worker alike.

A job is a Redis hash `personaplex:job:<id>` whose fields hold JSON values, so one field (progress,
status) can change without rewriting the others. Status changes go through named `JobStore` methods that
run a small Lua script: the change happens only from an allowed status, atomically, so a cancel from the
web and a start or finish in the worker can never overwrite each other. Every change is also published
as a JSON event on `personaplex:events:<id>` for WebSocket clients.

Retention: when a job becomes final its hash gets a TTL of `retention_s`, and its id goes into an expiry
index; `expire_old()` returns the ids whose time is up, so a cleanup can delete their blobs too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

import redis

from personaplex.errors import PersonaPlexError
from personaplex.fleet import WorkerRecord, record_from_json, record_to_json

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
"""A job id is a uuid4 hex; anything else is "not found" and never becomes a key or a path."""

CANCEL_FLAG_TTL_S = 24 * 3600
"""How long a cancel request stays readable (seconds), long enough for any queued job to be picked up."""


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_valid_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) is not None


def check_job_id(job_id: object) -> str:
    """Return the id if it is well formed; raise ValueError otherwise (a guard before building keys)."""
    if not is_valid_job_id(job_id):
        raise ValueError(f"Invalid job id {job_id!r}")
    return job_id  # type: ignore[return-value]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


FINAL_STATUSES = tuple(s for s in JobStatus if s.is_final)
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class Keys:
    """Every Redis key the service uses, built in one place from a validated id."""

    PREFIX = "personaplex:"
    INDEX = PREFIX + "jobs"  # zset: job id -> created_at, newest last
    QUEUED = PREFIX + "jobs:queued"  # zset: ids still queued, for queue_length()
    RUNNING = PREFIX + "jobs:running"  # zset: ids running -> start time, for recover_stalled()
    OUTBOX = PREFIX + "jobs:outbox"  # zset: queued ids -> time their message must have been sent by
    EXPIRY = PREFIX + "jobs:expiry"  # zset: final job id -> time its retention ends
    WORKERS = PREFIX + "workers"  # set: names of workers that have beaten (pruned once their beat expires)

    @classmethod
    def job(cls, job_id: str) -> str:
        return f"{cls.PREFIX}job:{check_job_id(job_id)}"

    @classmethod
    def cancel(cls, job_id: str) -> str:
        return f"{cls.PREFIX}job:{check_job_id(job_id)}:cancel"

    @classmethod
    def lease(cls, job_id: str) -> str:
        return f"{cls.PREFIX}job:{check_job_id(job_id)}:lease"

    @classmethod
    def events(cls, job_id: str) -> str:
        return f"{cls.PREFIX}events:{check_job_id(job_id)}"

    @classmethod
    def blob(cls, job_id: str, name: str) -> str:
        return f"{cls.PREFIX}blob:{check_job_id(job_id)}:{name}"

    @classmethod
    def outputs(cls, job_id: str) -> str:
        """The hash of a job's outputs per attempt, in the Redis blob store."""
        return f"{cls.PREFIX}blob:{check_job_id(job_id)}:outputs"

    @classmethod
    def worker(cls, name: str) -> str:
        return f"{cls.PREFIX}worker:{name}"

    VOICES = PREFIX + "voices"  # zset: custom voice id -> created_at (personaplex.custom_voices)

    @classmethod
    def voice(cls, voice_id: str) -> str:
        """A custom voice (hash: meta, audio, codes per model); the id is checked by the caller."""
        return f"{cls.PREFIX}voice:{voice_id}"

    LIVE_WAITING = PREFIX + "live:waiting"  # zset: conversation id -> time it asked for a row
    LIVE_RECORD = PREFIX + "live:"  # + conversation id: its record (`live`)
    ARRIVALS = PREFIX + "work:arrivals"
    """Channel: a job was queued or a conversation asked for a row (`announce_work`); running loops
    with a free row look for it at their next frame (worker.arrivals)."""

    @classmethod
    def live(cls, session_id: str) -> str:
        """A live conversation's record (hash: params, status, worker); ids are job ids' form."""
        return cls.LIVE_RECORD + check_job_id(session_id)

    @classmethod
    def live_in(cls, session_id: str) -> str:
        """Its input stream: the user's PCM frames, then an end marker."""
        return f"{cls.PREFIX}live:{check_job_id(session_id)}:in"

    @classmethod
    def live_out(cls, session_id: str) -> str:
        """Its output stream: its frames (text piece, PCM, tokens), then an end or an error."""
        return f"{cls.PREFIX}live:{check_job_id(session_id)}:out"

    @classmethod
    def live_alive(cls, session_id: str) -> str:
        """Set, with a short TTL, while a worker runs it: gone means that worker died."""
        return f"{cls.PREFIX}live:{check_job_id(session_id)}:alive"

    @classmethod
    def live_keys(cls, session_id: str) -> list[str]:
        """Every key of one conversation."""
        return [
            cls.live(session_id),
            cls.live_in(session_id),
            cls.live_out(session_id),
            cls.live_alive(session_id),
        ]


def announce_work(client: redis.Redis | redis.client.Pipeline) -> None:
    """Tell the workers' running loops that work is waiting (`Keys.ARRIVALS`): with a free row,
    one looks at once instead of at its next fallback look. Fire and forget: a loop that missed it
    finds the work at that look."""
    client.publish(Keys.ARRIVALS, "1")


@dataclass
class Job:
    """One job as clients see it. `progress` is {} until the worker reports {phase, done, total}."""

    id: str = field(default_factory=new_job_id)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    input_name: str = "input.wav"
    input_duration_s: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    batch_id: str | None = None
    owner: str | None = None  # the name of the API key that made it; None: made without keys
    note: str | None = None
    """What the service did to the job beyond its status (e.g. queued again after its worker died)."""

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (status as its string value)."""
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_hash(self) -> dict[str, str]:
        return _encode(self.to_dict())

    @classmethod
    def from_hash(cls, raw: dict[bytes | str, bytes | str]) -> Job:
        return cls.from_dict({_text(k): json.loads(v) for k, v in raw.items()})


def _encode(values: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v.value if isinstance(v, JobStatus) else v) for k, v in values.items()}


FENCE_REFUSED = -2
"""What the transition script answers when a fenced write's lease or attempt no longer holds."""


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# KEYS: job hash, queued zset, expiry zset, cancel flag, run lease, running zset.
# ARGV: job id, allowed statuses (JSON-encoded, comma separated; '' = any), new status JSON ('' = none),
#       increment attempts ('1'/'0'), ttl seconds ('0' = none), expiry score, fence owner ('' = none),
#       fence attempt ('' = none), now, then field/value pairs.
# Returns -1 if the job is missing, -2 if the fence does not hold (the lease is not the owner's, or the
# record has moved on to another attempt), 0 if its status is not allowed, 1 if updated.
_TRANSITION_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[7] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[7] then return -2 end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[8] then return -2 end
if ARGV[2] ~= '' then
  local current = redis.call('HGET', KEYS[1], 'status')
  local allowed = false
  for s in string.gmatch(ARGV[2], '[^,]+') do
    if s == current then allowed = true end
  end
  if not allowed then return 0 end
end
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if #ARGV > 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 10)) end
if ARGV[3] ~= '' and ARGV[3] ~= '"queued"' then redis.call('ZREM', KEYS[2], ARGV[1]) end
if ARGV[3] == '"running"' then
  redis.call('ZADD', KEYS[6], ARGV[9], ARGV[1])
elseif ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[6], ARGV[1])
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ttl) end
end
return 1
"""


# KEYS: index zset, queued zset, outbox zset, then each job's hash. ARGV: queue limit ('' = none),
# queued jobs among them, the time their messages must be sent by, then per job: id, created_at,
# '1' if queued, field count, field/value pairs.
# Writes every job, or none when the queued ones would not fit; returns -1, or the queue's length.
_CREATE_LUA = """
local queued = redis.call('ZCARD', KEYS[2])
if ARGV[1] ~= '' and queued + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return queued end
local i = 4
for j = 4, #KEYS do
  local fields = tonumber(ARGV[i + 3])
  redis.call('HSET', KEYS[j], unpack(ARGV, i + 4, i + 3 + 2 * fields))
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  if ARGV[i + 2] == '1' then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
    redis.call('ZADD', KEYS[3], ARGV[3], ARGV[i])
  end
  i = i + 4 + 2 * fields
end
return -1
"""


# KEYS: running zset, queued zset, outbox zset, then each job's hash, then each job's lease.
# ARGV: now, then the ids. A running job whose lease is gone (its worker died or lost Redis for
# longer than the lease) goes back to queued, its message due at once; entries of jobs that are no
# longer running are dropped. Returns the ids queued again.
_RECOVER_LUA = """
local n = #ARGV - 1
local requeued = {}
for i = 1, n do
  local id, job, lease = ARGV[i + 1], KEYS[3 + i], KEYS[3 + n + i]
  if redis.call('EXISTS', lease) == 0 then
    local status = redis.call('HGET', job, 'status')
    if status == '"running"' then
      local attempts = redis.call('HGET', job, 'attempts') or '0'
      local worker = redis.call('HGET', job, 'worker') or 'null'
      local note = 'Attempt ' .. attempts .. ' stopped: its worker ' .. cjson.decode(worker) ..
        ' lost the job (no lease renewal); queued again for attempt ' .. (tonumber(attempts) + 1) .. '.'
      redis.call('HSET', job, 'status', '"queued"', 'progress', '{}', 'note', cjson.encode(note))
      redis.call('ZADD', KEYS[2], tonumber(redis.call('HGET', job, 'created_at')), id)
      redis.call('ZADD', KEYS[3], ARGV[1], id)
      table.insert(requeued, id)
    end
    redis.call('ZREM', KEYS[1], id)
  end
end
return requeued
"""


# KEYS: outbox zset, then each due job's hash. ARGV: the time the next try is due, then the ids.
# A due job still queued is handed out (and put back, due again later, in case its message is not
# sent this time either); any other is dropped from the outbox. Returns the ids to send.
_DUE_LUA = """
local due = {}
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[i], 'status') == '"queued"' then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    table.insert(due, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return due
"""


class QueueFullError(PersonaPlexError):
    """The queue had no room for the jobs: nothing was written."""

    def __init__(self, queued: int, incoming: int, limit: int) -> None:
        super().__init__(f"The queue holds {queued} jobs (limit {limit}); {incoming} more do not fit.")
        self.queued, self.incoming, self.limit = queued, incoming, limit


# KEYS: lease, job hash. ARGV: owner, ttl ms ('0' = release), attempt ('' = never take it back).
# Changes the lease only if `owner` holds it. A lease that is gone (it expired while Redis was
# unreachable, say) is taken back only while the record still says this attempt is running: if the
# job was queued again or another attempt started, the owner has lost it. Returns 1 (held), 2 (taken
# back) or 0 (lost).
_LEASE_LUA = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if current or ARGV[2] == '0' or ARGV[3] == '' then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= '"running"' then return 0 end
if redis.call('HGET', KEYS[2], 'attempts') ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""


@dataclass(frozen=True)
class Fence:
    """One attempt's right to write a job: the run lease's owner token and the attempt number.

    A write under a fence happens only while the lease is still the owner's and the record still
    counts this attempt, checked in the same script as the write: a worker that was paused past its
    lease (SIGSTOP, a long GC, a network partition) can no longer overwrite the attempt that took over.
    """

    owner: str
    attempt: int


class LeaseLost(Exception):
    """A worker's write was refused: its run lease expired and the job moved on (another attempt, or
    queued again). The worker must stop that job and write nothing more for it."""


class JobStore:
    """Reads and changes job records; `retention_s` is how long a finished job is kept."""

    def __init__(
        self, redis_client: redis.Redis, retention_s: float = 24 * 3600.0, dispatch_grace_s: float = 10.0
    ) -> None:
        self.redis = redis_client
        self.retention_s = retention_s
        self.dispatch_grace_s = dispatch_grace_s
        """Seconds a queued job may wait for its message to be sent before a sweeper sends it."""
        self._transition = redis_client.register_script(_TRANSITION_LUA)
        self._lease = redis_client.register_script(_LEASE_LUA)
        self._create = redis_client.register_script(_CREATE_LUA)
        self._recover = redis_client.register_script(_RECOVER_LUA)
        self._due = redis_client.register_script(_DUE_LUA)

    # -- records -------------------------------------------------------------------------------

    def create(self, job: Job) -> Job:
        """Store a new queued job, index it and publish "queued"."""
        self.create_many([job])
        return job

    def create_many(self, jobs: Sequence[Job], queue_limit: int | None = None) -> None:
        """Store every job, or none if the queued ones would take the queue past `queue_limit`.

        The room check and the writes are one script, so requests arriving together cannot pass the
        limit between them.
        """
        args: list[str | float] = []
        for job in jobs:
            record = job.to_hash()
            args += [check_job_id(job.id), job.created_at, int(job.status is JobStatus.QUEUED), len(record)]
            args += [item for pair in record.items() for item in pair]
        incoming = sum(job.status is JobStatus.QUEUED for job in jobs)
        limit = "" if queue_limit is None else queue_limit
        send_by = time.time() + self.dispatch_grace_s
        keys = [Keys.INDEX, Keys.QUEUED, Keys.OUTBOX, *(Keys.job(job.id) for job in jobs)]
        queued = int(self._create(keys=keys, args=[limit, incoming, send_by, *args]))
        if queued >= 0:
            raise QueueFullError(queued, incoming, int(limit))
        for job in jobs:
            self.publish(job.id, {"type": "queued", "status": job.status.value})
        if incoming:
            announce_work(self.redis)

    def get(self, job_id: str) -> Job | None:
        """The job, or None if the id is malformed, unknown or expired."""
        if not is_valid_job_id(job_id):
            return None
        raw = self.redis.hgetall(Keys.job(job_id))
        return Job.from_hash(raw) if raw else None

    def get_many(self, job_ids: Iterable[str]) -> list[Job]:
        """The jobs that exist among `job_ids`, in the given order, in one round trip."""
        ids = [j for j in job_ids if is_valid_job_id(j)]
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hgetall(Keys.job(job_id))
        return [Job.from_hash(raw) for raw in pipe.execute() if raw]

    # -- status transitions ---------------------------------------------------------------------

    def mark_running(self, job_id: str, worker: str) -> Job | None:
        """Start (or restart, on redelivery) a job: count the attempt and record the worker.

        Returns the job afterwards; if it was already final it comes back unchanged, so the caller
        sees that status and does nothing. None if the job does not exist.
        """
        values = {"status": JobStatus.RUNNING, "worker": worker, "started_at": time.time(), "error": None}
        if self._apply(job_id, values, allowed=ACTIVE_STATUSES, incr_attempts=True) == -1:
            return None
        job = self.get(job_id)
        if job is not None and job.status is JobStatus.RUNNING and job.worker == worker:
            self.publish(job_id, {"type": "started", "worker": worker, "attempts": job.attempts})
        return job

    def claim(self, job_id: str, worker: str) -> Job | None:
        """Start a job that is still queued, for a worker that takes it into its running batch.

        Like mark_running (counts the attempt, records the worker) but only from queued, so a job
        cancelled or started meanwhile is left alone. The caller holds the job's run lease first.
        Returns the running job, or None if it was not queued.
        """
        values = {"status": JobStatus.RUNNING, "worker": worker, "started_at": time.time(), "error": None}
        if self._apply(job_id, values, allowed=(JobStatus.QUEUED,), incr_attempts=True) != 1:
            return None
        job = self.get(job_id)
        if job is not None:
            self.publish(job_id, {"type": "started", "worker": worker, "attempts": job.attempts})
        return job

    # The worker passes its attempt's `fence`; a refused fence raises LeaseLost.

    def mark_succeeded(self, job_id: str, result: dict[str, Any], fence: Fence | None = None) -> bool:
        return self._finish(job_id, JobStatus.SUCCEEDED, {"result": result}, {"result": result}, fence=fence)

    def mark_failed(self, job_id: str, error: str, fence: Fence | None = None) -> bool:
        return self._finish(job_id, JobStatus.FAILED, {"error": error}, {"error": error}, fence=fence)

    def mark_cancelled(self, job_id: str, fence: Fence | None = None) -> bool:
        return self._finish(job_id, JobStatus.CANCELLED, {}, {}, fence=fence)

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        values: dict[str, Any],
        event: dict[str, Any],
        allowed: Iterable[JobStatus] = ACTIVE_STATUSES,
        fence: Fence | None = None,
    ) -> bool:
        now = time.time()
        changed = self._apply(
            job_id,
            {"status": status, "finished_at": now, **values},
            allowed=allowed,
            ttl_s=self.retention_s,
            expires_at=now + self.retention_s,
            fence=fence,
        )
        if changed == FENCE_REFUSED:
            raise LeaseLost(f"job {job_id}: attempt {fence.attempt if fence else '?'} no longer holds it")
        if changed == 1:
            self.publish(job_id, {"type": status.value, "status": status.value, **event})
        return changed == 1

    def _apply(
        self,
        job_id: str,
        values: dict[str, Any],
        allowed: Iterable[JobStatus] = (),
        incr_attempts: bool = False,
        ttl_s: float = 0,
        expires_at: float = 0,
        fence: Fence | None = None,
    ) -> int:
        if not is_valid_job_id(job_id):
            return -1
        encoded = _encode(values)
        pairs = [item for kv in encoded.items() for item in kv]
        args = [
            job_id,
            ",".join(json.dumps(s.value) for s in allowed),
            encoded.get("status", ""),
            "1" if incr_attempts else "0",
            str(max(int(ttl_s), 1) if ttl_s else 0),
            repr(expires_at),
            fence.owner if fence else "",
            str(fence.attempt) if fence else "",
            repr(time.time()),
            *pairs,
        ]
        keys = [
            Keys.job(job_id),
            Keys.QUEUED,
            Keys.EXPIRY,
            Keys.cancel(job_id),
            Keys.lease(job_id),
            Keys.RUNNING,
        ]
        return int(self._transition(keys=keys, args=args))

    # -- progress, cancel, events ----------------------------------------------------------------

    def set_progress(
        self, job_id: str, phase: str, done: int, total: int, fence: Fence | None = None
    ) -> bool:
        """Record and publish progress of a running job; False if it is not running (any more), or
        not by this attempt."""
        progress = {"phase": phase, "done": int(done), "total": int(total)}
        if self._apply(job_id, {"progress": progress}, allowed=(JobStatus.RUNNING,), fence=fence) != 1:
            return False
        self.publish(job_id, {"type": "progress", **progress})
        return True

    def request_cancel(self, job_id: str) -> Job | None:
        """Ask for a job to stop. A queued job is cancelled at once; a running one at its next frame.

        Returns the job afterwards (a final job is left as it is), or None if it does not exist.
        """
        job = self.get(job_id)
        if job is None:
            return None
        if job.status.is_final:
            return job
        self.redis.set(Keys.cancel(job_id), "1", ex=CANCEL_FLAG_TTL_S)
        if job.status is JobStatus.QUEUED:
            self._finish(job_id, JobStatus.CANCELLED, {}, {}, allowed=(JobStatus.QUEUED,))
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return is_valid_job_id(job_id) and bool(self.redis.exists(Keys.cancel(job_id)))

    def publish(self, job_id: str, event: dict[str, Any]) -> int:
        """Send one JSON event {"type", "job_id", ...} to the job's channel; returns subscribers reached."""
        payload = {"job_id": job_id, **event, "timestamp": time.time()}
        return int(self.redis.publish(Keys.events(job_id), json.dumps(payload)))

    # -- run leases ------------------------------------------------------------------------------
    # A job outliving the visibility timeout is redelivered while its first worker still runs it.
    # The lease (owner token with a TTL the running worker keeps refreshing) sends the second delivery
    # away to come back later instead of running the job twice at once; a dead owner's lease expires.

    def acquire_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's run lease if nobody holds it."""
        return bool(self.redis.set(Keys.lease(job_id), owner, nx=True, px=_ms(ttl_s)))

    def refresh_lease(self, job_id: str, owner: str, ttl_s: float, attempt: int | None = None) -> bool:
        """Extend the lease; False if `owner` no longer holds it.

        With `attempt`, a lease that vanished is taken back while the record still says that attempt
        runs (after a Redis outage longer than the TTL); otherwise the job has moved on and is lost.
        """
        args = [owner, _ms(ttl_s), "" if attempt is None else str(attempt)]
        return bool(self._lease(keys=[Keys.lease(job_id), Keys.job(job_id)], args=args))

    def release_lease(self, job_id: str, owner: str) -> bool:
        return bool(self._lease(keys=[Keys.lease(job_id), Keys.job(job_id)], args=[owner, 0, ""]))

    def lease_owner(self, job_id: str) -> str | None:
        owner = self.redis.get(Keys.lease(job_id)) if is_valid_job_id(job_id) else None
        return _text(owner) if owner is not None else None

    # -- recovery: stalled jobs and unsent messages --------------------------------------------------
    # Every worker's housekeeping runs these, so a job never waits on Celery's visibility timeout
    # (hours) for a dead worker, nor forever for a message its web process died before sending.

    def recover_stalled(self, limit: int = 500) -> list[str]:
        """Queue again every running job whose lease has expired; returns their ids (due to be sent).

        A running job's lease is refreshed by its live worker every fraction of its TTL, so a gone
        lease means its worker died, or lost Redis for longer than the TTL. The record says what
        happened (`note`), and the next attempt counts as one.
        """
        ids = [_text(i) for i in self.redis.zrange(Keys.RUNNING, 0, max(limit, 1) - 1)]
        ids = [i for i in ids if is_valid_job_id(i)]
        if not ids:
            return []
        keys = [Keys.RUNNING, Keys.QUEUED, Keys.OUTBOX, *map(Keys.job, ids), *map(Keys.lease, ids)]
        requeued = [_text(i) for i in self._recover(keys=keys, args=[repr(time.time()), *ids])]
        for job_id in requeued:
            job = self.get(job_id)
            self.publish(job_id, {"type": "requeued", "status": "queued", "note": job.note if job else None})
        if requeued:
            announce_work(self.redis)
        return requeued

    def due_for_dispatch(self, limit: int = 100) -> list[str]:
        """Queued jobs whose message should have been sent by now; each comes back due again after
        the grace unless `mark_dispatched` says it was sent."""
        now = time.time()
        ids = self.redis.zrangebyscore(Keys.OUTBOX, "-inf", now, start=0, num=limit)
        ids = [i for i in map(_text, ids) if is_valid_job_id(i)]
        if not ids:
            return []
        keys = [Keys.OUTBOX, *map(Keys.job, ids)]
        return [_text(i) for i in self._due(keys=keys, args=[repr(now + self.dispatch_grace_s), *ids])]

    def mark_dispatched(self, *job_ids: str) -> None:
        """The jobs' messages are with the broker: no sweeper needs to send them."""
        if job_ids:
            self.redis.zrem(Keys.OUTBOX, *job_ids)

    # -- listing and retention -------------------------------------------------------------------

    def list_recent(
        self, status: JobStatus | str | None = None, limit: int = 50, owner: str | None = None
    ) -> list[Job]:
        """Newest jobs first, optionally only those in one status and (`owner`) of one key's name.

        Filters read the index until `limit` jobs match: at worst every job retention keeps.
        """
        wanted = JobStatus(status) if status is not None else None
        found: list[Job] = []
        for chunk in self._index_chunks(max(limit, 1) * 2):
            found.extend(
                j
                for j in self.get_many(chunk)
                if (wanted is None or j.status is wanted) and (owner is None or j.owner == owner)
            )
            if len(found) >= limit:
                break
        return found[:limit]

    def _index_chunks(self, size: int) -> Iterator[list[str]]:
        start = 0
        while True:
            ids = [_text(i) for i in self.redis.zrevrange(Keys.INDEX, start, start + size - 1)]
            if not ids:
                return
            yield ids
            start += size

    def queued_ids(self, limit: int) -> list[str]:
        """The ids of up to `limit` queued jobs, oldest first (what a worker may claim into a batch)."""
        return [_text(i) for i in self.redis.zrange(Keys.QUEUED, 0, max(limit, 1) - 1)]

    def queue_length(self) -> int:
        """How many jobs wait to start (the 429 check reads this)."""
        return int(self.redis.zcard(Keys.QUEUED))

    def expire_old(self, now: float | None = None) -> list[str]:
        """Drop jobs whose retention has ended from the indexes and return their ids (to delete blobs)."""
        cutoff = time.time() if now is None else now
        ids = [_text(i) for i in self.redis.zrangebyscore(Keys.EXPIRY, "-inf", cutoff)]
        if not ids:
            return []
        pipe = self.redis.pipeline()
        pipe.zrem(Keys.EXPIRY, *ids)
        pipe.zrem(Keys.INDEX, *ids)
        pipe.zrem(Keys.QUEUED, *ids)
        pipe.zrem(Keys.RUNNING, *ids)
        pipe.zrem(Keys.OUTBOX, *ids)
        for job_id in ids:
            pipe.delete(Keys.job(job_id), Keys.cancel(job_id), Keys.lease(job_id))
        pipe.execute()
        return ids


# KEYS: the set of worker names, then each named worker's heartbeat key; ARGV: the names. Returns the
# live records and drops the names whose heartbeat has expired, in one step (no beat slips between).
_LIVE_WORKERS_LUA = """
local records = {}
for i, name in ipairs(ARGV) do
  local record = redis.call('GET', KEYS[i + 1])
  if record then
    table.insert(records, record)
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return records
"""


class WorkerRegistry:
    """Worker heartbeats: each live worker keeps a JSON record with a TTL; a dead one drops out.

    A set names the workers, so reading the fleet costs two round trips and never scans the keyspace
    (which holds every job's keys too).
    """

    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client
        self._live = redis_client.register_script(_LIVE_WORKERS_LUA)

    def beat(self, name: str, record: WorkerRecord, ttl_s: float) -> None:
        """Write the worker's record, stamped with its name and the time, to live `ttl_s` seconds."""
        payload: WorkerRecord = {**record, "worker": name, "timestamp": time.time()}
        with self.redis.pipeline() as pipe:
            pipe.set(Keys.worker(name), record_to_json(payload), px=_ms(ttl_s))
            pipe.sadd(Keys.WORKERS, name)
            pipe.execute()

    def forget(self, name: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(Keys.worker(name))
            pipe.srem(Keys.WORKERS, name)
            pipe.execute()

    def live(self) -> list[WorkerRecord]:
        """Every worker whose heartbeat has not expired, sorted by name."""
        names = sorted(_text(name) for name in self.redis.smembers(Keys.WORKERS))
        if not names:
            return []
        records = self._live(keys=[Keys.WORKERS, *map(Keys.worker, names)], args=names)
        return sorted(map(record_from_json, records), key=lambda record: record["worker"])
