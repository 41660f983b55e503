"""A background thread per worker: heartbeat record, job lease, idle offload, retention cleanup, and
recovery of the fleet's jobs.

The heartbeat is the worker's gpu_status plus a timestamp, written to `personaplex:worker:<name>` with a
TTL of `heartbeat_ttl`, so the web can list live workers without a broadcast, and a SIGKILLed worker
drops out after at most one TTL. Each duty catches its own errors: a Redis outage must not kill the
thread, and the next beat after Redis returns puts the worker back.

Recovery (every worker runs it; the scripts behind it hand each job to one of them): a running job
whose lease has expired (its worker died, or was paused or cut off for longer than the lease) is
queued again as a new attempt, within about one heartbeat TTL plus one RECOVER_EVERY_S, whatever
Celery's visibility timeout; and any queued job whose message was never sent (its web process died
between the record and the message) or was queued again here gets its message. A second message for
a job is harmless: the delivery that comes second finds it running or final.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from personaplex.storage import delete_expired
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

TICK_S = 0.5
"""How often the thread wakes to refresh the running job's lease and check the idle deadline (s)."""

BEATS_PER_TTL = 3
"""Heartbeats written per TTL: a worker survives two lost writes before it drops out."""

CLEANUP_EVERY_S = 60.0
"""Seconds between retention sweeps (jobs past retention and their blobs)."""

RECOVER_EVERY_S = 1.0
"""Seconds between looks for stalled jobs and unsent messages (two small scripts each time)."""

SendJob = Callable[[str], object]
"""Publishes one job's Celery message (the worker's app.send_task)."""


class Housekeeper(threading.Thread):
    """Runs until stop(); started when the worker is ready, stopped at worker shutdown."""

    def __init__(self, runtime: WorkerRuntime, worker: str, send_job: SendJob) -> None:
        super().__init__(name=f"housekeeper-{worker}", daemon=True)
        self.runtime = runtime
        self.worker = worker
        self.send_job = send_job
        self._stopped = threading.Event()
        self._next_beat = 0.0
        self._next_cleanup = 0.0
        self._next_recovery = 0.0

    def run(self) -> None:
        # Importing torch takes seconds: do it aside, so the first beats and lease refreshes are on time.
        threading.Thread(target=self._prepare_engine, name="engine-import", daemon=True).start()
        while not self._stopped.is_set():
            self.tick(time.monotonic())
            self._stopped.wait(TICK_S)

    def tick(self, now: float) -> None:
        self._safely(self.runtime.refresh_lease, "job lease refresh")
        self._safely(self.runtime.offload_if_due, "deferred or idle offload")
        if now >= self._next_beat:
            self._next_beat = now + self.runtime.settings.heartbeat_ttl / BEATS_PER_TTL
            self._safely(self.beat, "heartbeat")
        if now >= self._next_recovery:
            self._next_recovery = now + RECOVER_EVERY_S
            self._safely(self.recover, "job recovery")
        if now >= self._next_cleanup:
            self._next_cleanup = now + CLEANUP_EVERY_S
            self._safely(self.cleanup, "retention cleanup")

    def _prepare_engine(self) -> None:
        """Create the engine object (imports torch; loads nothing) so the first job starts sooner."""
        self._safely(self.runtime.engine, "prepare the engine")

    def beat(self) -> None:
        record = self.runtime.status(self.worker)
        self.runtime.registry.beat(self.worker, record, self.runtime.settings.heartbeat_ttl)

    def recover(self) -> None:
        """Queue again the jobs of workers that stopped renewing their leases, then send every
        message that is due (those jobs', and any a web process failed to send)."""
        jobs = self.runtime.jobs
        for job_id in jobs.recover_stalled():
            log.warning("job %s: its worker stopped renewing its lease; queued again", job_id)
        for job_id in jobs.due_for_dispatch():
            self.send_job(job_id)
            jobs.mark_dispatched(job_id)
            log.info("job %s: sent its message (it had none in flight)", job_id)

    def cleanup(self) -> None:
        expired = delete_expired(self.runtime.jobs, self.runtime.blobs)
        if expired:
            log.info("deleted %d jobs past retention", len(expired))

    def stop(self) -> None:
        """Stop beating and remove the heartbeat, so a cleanly stopped worker leaves status at once."""
        self._stopped.set()
        self.join(timeout=5)
        self._safely(lambda: self.runtime.registry.forget(self.worker), "remove heartbeat")

    def _safely(self, duty: Callable[[], object], what: str) -> None:
        try:
            duty()
        except Exception:
            log.warning("housekeeping: %s failed", what, exc_info=True)
