"""The per-process worker state: one resident engine, the running job, offload and idle bookkeeping.

Threads touching it: the task thread (runs jobs), the event-loop thread (control commands, which must
never block) and the housekeeping thread (heartbeat, idle offload). Two locks keep them apart:

- `_state` guards the small fields (running job, the jobs of its batch and their progress,
  timestamps); it is only held briefly. The worker is busy while a delivery holds the task slot
  (`job_running`), whatever jobs its batch still runs.
- `_engine_lock` serialises load and offload. A control command waits for it at most
  CONTROL_LOCK_WAIT_S (an offload in progress takes milliseconds); if it is still busy the reply is
  "deferred" and housekeeping runs the offload as soon as the worker is idle.
- `_create_lock` guards creating the engine object (importing torch takes seconds; status never
  waits for it).

The engine module imports torch, so it is imported here lazily, never when the worker package loads.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis

from personaplex.custom_voices import VoiceStore
from personaplex.fleet import GpuMemory, OffloadReply, OffloadStatus, PromptCacheStats, WorkerRecord
from personaplex.jobs import Fence, JobStore, WorkerRegistry
from personaplex.params import FRAME_RATE
from personaplex.settings import Settings
from personaplex.storage import BlobStore, open_blob_store

if TYPE_CHECKING:
    from personaplex.engine.core import Engine
    from worker.loop import EngineLoop

log = logging.getLogger(__name__)

CONTROL_LOCK_WAIT_S = 0.3
"""Longest a control command waits for a load/offload in progress before replying "deferred" (s)."""

REDIS_SOCKET_TIMEOUT_S = 10.0
"""A Redis call that takes longer fails instead of hanging a job or the heartbeat (seconds)."""


class WorkerRuntime:
    """Everything one worker process shares between its task, control and housekeeping threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=5.0
        )
        self.jobs = JobStore(
            self.redis, retention_s=settings.retention_s, dispatch_grace_s=settings.dispatch_grace_s
        )
        self.blobs: BlobStore = open_blob_store(settings, self.redis)
        self.registry = WorkerRegistry(self.redis)
        self.lease_owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This process's token in job run leases (unique even if a worker restarts under its name)."""
        self._state = threading.Lock()
        self._engine_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._engine: Engine | None = None
        self._running_job: str | None = None
        """The job whose delivery holds the task slot (busy while set)."""
        self._batch: dict[str, dict[str, Any] | None] = {}
        """Every job this worker is running now (the delivery's and those claimed into its batch),
        in start order, with its progress."""
        self._fences: dict[str, Fence] = {}
        """The attempt each running job is on, once it has started (its writes are fenced with it)."""
        self._lost: set[str] = set()
        """Running jobs whose lease was found lost: their rows stop and write nothing."""
        self._last_used: float | None = None
        self._offload_pending = False
        self._draining = False
        self._loop_active = False
        """The engine loop is running (some row is busy): the model is in use."""
        self._loop: EngineLoop | None = None

    # -- engine ----------------------------------------------------------------------------------

    def engine(self) -> Engine:
        """The engine object (created on first use; creating it imports torch but loads nothing)."""
        with self._create_lock:
            if self._engine is None:
                from personaplex.engine.core import Engine

                s = self.settings
                self._engine = Engine(
                    s.model,
                    device=s.device,
                    cpu_offload=s.cpu_offload,
                    max_audio_seconds=s.max_audio_seconds,
                    hf_token=s.hf_token,
                    max_batch=s.max_batch,
                    max_batch_frames=s.max_batch_frames,
                    prompt_cache_mb=s.prompt_cache_mb,
                    live_frames=math.ceil(s.max_live_seconds * FRAME_RATE) if s.max_live else 0,
                    custom_voices=VoiceStore(self.redis),
                )
            return self._engine

    def loop(self, worker: str) -> EngineLoop:
        """The worker's engine loop (worker.loop), created and started on first use."""
        with self._create_lock:
            if self._loop is None:
                from worker.loop import EngineLoop

                self._loop = EngineLoop(self, worker)
        self._loop.start()
        return self._loop

    def ensure_loaded(self) -> float:
        """Load the model if it is not resident; returns the seconds spent (0 when it was)."""
        engine = self.engine()
        with self._engine_lock:
            seconds = engine.load()
        self._touch()
        return seconds

    @property
    def model_loaded(self) -> bool:
        engine = self._engine
        return engine is not None and engine.is_loaded

    # -- the running job -----------------------------------------------------------------------

    @contextmanager
    def job_running(self, job_id: str) -> Iterator[None]:
        """Mark `job_id` as the job whose delivery holds the task slot (its lease is refreshed)."""
        with self._state:
            self._running_job = job_id
            self._batch.setdefault(job_id, None)
        try:
            yield
        finally:
            with self._state:
                self._running_job = None
            self.leave_batch(job_id)  # its row settled already, or it never reached the loop
            self._after_use()

    @contextmanager
    def loop_running(self) -> Iterator[None]:
        """The engine loop runs (the model is in use); afterwards run an offload deferred meanwhile."""
        with self._state:
            self._loop_active = True
        try:
            yield
        finally:
            with self._state:
                self._loop_active = False  # each job left the batch as it settled (leave_batch)
            self._after_use()

    def _after_use(self) -> None:
        """The model was used until now: its idle time starts, and an offload deferred meanwhile
        runs once nothing uses it."""
        with self._state:
            pending = self._offload_pending and not self._busy()
            if pending:
                self._offload_pending = False
        self._touch()
        if pending:
            log.info("running the offload deferred while the model was in use")
            self._offload_now(wait_s=None)

    def _busy(self) -> bool:
        """Whether the model is in use: a delivery holds the task slot or the loop runs."""
        return self._running_job is not None or self._loop_active

    @property
    def admits_jobs(self) -> bool:
        """Whether the running loop may take more jobs: not while an offload waits for it to drain,
        nor once the worker is shutting down (its warm shutdown waits for the loop)."""
        with self._state:
            return not (self._offload_pending or self._draining)

    def drain(self) -> None:
        """The worker is shutting down: the running loop finishes its jobs and takes no more."""
        with self._state:
            self._draining = True

    def stop_loop(self) -> None:
        """End the loop's conversations and wait for its jobs to finish (a warm shutdown's last step)."""
        self.drain()
        if self._loop is not None:
            self._loop.stop()

    def add_to_batch(self, job_id: str) -> None:
        """A job claimed into the running delivery's batch: its lease is refreshed from now on."""
        with self._state:
            self._batch.setdefault(job_id, None)

    def started(self, job_id: str, attempt: int) -> Fence:
        """The job's attempt has started: its fence, also used to take its lease back after an outage."""
        fence = Fence(self.lease_owner, attempt)
        with self._state:
            self._fences[job_id] = fence
        return fence

    def leave_batch(self, job_id: str) -> None:
        """A job of the batch ended (or was not claimed after all): stop refreshing its lease."""
        with self._state:
            self._batch.pop(job_id, None)
            self._fences.pop(job_id, None)
            self._lost.discard(job_id)

    def lease_lost(self, job_id: str) -> bool:
        """Whether the job's lease was found taken or gone for good: its row must stop."""
        with self._state:
            return job_id in self._lost

    def refresh_lease(self) -> None:
        """Keep the running jobs' leases alive (housekeeping calls this well within their TTL).

        A refresh that finds the lease another's, or gone while the job moved on, marks the job lost:
        the engine drops its row at the next frame and the worker writes nothing for it. A Redis
        error leaves everything as it is: the next tick tries again, and takes the lease back if it
        expired meanwhile and nobody else took the job.
        """
        with self._state:
            running = [
                (job_id, self._fences.get(job_id)) for job_id in self._batch if job_id not in self._lost
            ]
        for job_id, fence in running:
            attempt = fence.attempt if fence else None
            if self.jobs.refresh_lease(job_id, self.lease_owner, self.settings.heartbeat_ttl, attempt):
                continue
            if fence is None:
                continue  # not started yet: the start itself will fail, or find the job moved on
            log.warning("job %s: attempt %d lost its lease; stopping it, writing nothing", job_id, attempt)
            with self._state:
                self._lost.add(job_id)

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._state:
            if job_id in self._batch:
                self._batch[job_id] = progress

    def _touch(self) -> None:
        with self._state:
            self._last_used = time.time()

    # -- offload ---------------------------------------------------------------------------------

    def request_offload(self) -> OffloadReply:
        """Free the model now, or defer it to the end of the running job (waits at most 0.3 s)."""
        with self._state:
            if self._busy():
                self._offload_pending = True
                return self._offload_reply(OffloadStatus.DEFERRED)
        status = self._offload_now(wait_s=CONTROL_LOCK_WAIT_S)
        if status is OffloadStatus.DEFERRED:
            with self._state:
                self._offload_pending = True
        return self._offload_reply(status)

    def offload_if_due(self, now: float | None = None) -> bool:
        """Run a deferred offload once no job runs, or offload a model idle for `gpu_idle_timeout`.

        Housekeeping calls this every tick; True if it offloaded.
        """
        with self._state:
            pending = self._offload_pending and not self._busy()
        if pending:
            status = self._offload_now(wait_s=0)
            if status is not OffloadStatus.DEFERRED:
                with self._state:
                    self._offload_pending = False
            return status is OffloadStatus.OFFLOADED
        deadline = self.idle_deadline()
        if deadline is None or (time.time() if now is None else now) < deadline:
            return False
        log.info("model idle for %.0f s: offloading", self.settings.gpu_idle_timeout)
        return self._offload_now(wait_s=0) is OffloadStatus.OFFLOADED

    def idle_deadline(self) -> float | None:
        """When the idle model will be offloaded (unix time), or None if it is busy, unloaded or kept."""
        timeout = self.settings.gpu_idle_timeout
        with self._state:
            busy, last_used = self._busy(), self._last_used
        if timeout <= 0 or busy or not self.model_loaded:
            return None
        return (last_used or time.time()) + timeout

    def _offload_now(self, wait_s: float | None) -> OffloadStatus:
        """Offload unless a job runs; waits for the engine lock `wait_s` seconds (None: as needed)."""
        acquired = self._engine_lock.acquire(timeout=-1 if wait_s is None else wait_s)
        if not acquired:
            return OffloadStatus.DEFERRED  # a load or another offload is in progress
        try:
            with self._state:
                if self._busy():
                    return OffloadStatus.DEFERRED
            if not self.model_loaded:
                return OffloadStatus.NOT_LOADED
            self._engine.offload()  # type: ignore[union-attr]
            return OffloadStatus.OFFLOADED
        finally:
            self._engine_lock.release()

    def _offload_reply(self, status: OffloadStatus) -> OffloadReply:
        return {"status": status, "memory_allocated": self._gpu()["memory_allocated"]}

    # -- status ----------------------------------------------------------------------------------

    def status(self, worker: str) -> WorkerRecord:
        """The gpu_status reply (and heartbeat record): cheap, lock-light, safe from any thread."""
        with self._state:
            batch, last_used = dict(self._batch), self._last_used
        running = next(iter(batch), None)  # the first job still running (the delivery's, or the next)
        progress = batch.get(running) if running else None
        engine = self._engine
        live = self._loop.live_count() if self._loop is not None else 0
        free = self._loop.live_slots_free() if self._loop is not None else self.settings.max_live
        return {
            "worker": worker,
            "model": self.settings.model,
            "model_loaded": self.model_loaded,
            "device": str(engine.device) if engine is not None else self.settings.device,
            "gpu": self._gpu(),
            "running_job": running,
            "progress": dict(progress) if progress else None,
            "running_jobs": list(batch),
            "active_connections": len(batch) + live,  # the legacy server's name: jobs and conversations
            "live_sessions": live,
            "live_slots_free": free,
            "idle_timeout": self.settings.gpu_idle_timeout,
            "idle_deadline": self.idle_deadline(),
            "last_used": last_used,
            "prompt_cache": self._prompt_cache(),
        }

    def _prompt_cache(self) -> PromptCacheStats:
        engine = self._engine
        if engine is None:
            budget = round(self.settings.prompt_cache_mb, 3)
            return {"entries": 0, "megabytes": 0.0, "budget_megabytes": budget, "hits": 0, "misses": 0}
        return engine.prompt_cache.stats()

    def _gpu(self) -> GpuMemory:
        engine = self._engine
        if engine is None:
            return {"name": None, "memory_total": 0.0, "memory_allocated": 0.0, "memory_reserved": 0.0}
        s = engine.status()
        return {
            "name": s.get("gpu_name"),
            "memory_total": round(float(s.get("memory_total_mb") or 0.0), 1),
            "memory_allocated": round(float(s.get("memory_allocated_mb") or 0.0), 1),
            "memory_reserved": round(float(s.get("memory_reserved_mb") or 0.0), 1),
        }


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(Settings.from_env())
        return _runtime
