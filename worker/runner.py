"""One delivery of `process_audio(job_id)`: decide whether to run, run the engine, record the outcome.

Celery may deliver a job more than once (a worker died, or a job outlived the visibility timeout), so
every step is safe to repeat:
- a job already final is left alone;
- a delivery of a job whose run lease another worker holds does not wait for it: it asks Celery to
  deliver the job again one lease TTL later (`Outcome.retry_in`; the task re-publishes the message
  with that countdown and acks this one) and frees the worker's slot for other jobs. A later
  delivery finds the job final; a dead worker's lease has expired by then, and it takes the job over;
- a job whose outputs are complete is finished from them without rerunning the model;
- each start counts an attempt; past `max_attempts` the job fails with that reason;
- every write of an attempt (progress, outputs, final record) is fenced by its run lease and attempt
  number (`personaplex.jobs.Fence`): outputs go to the attempt's own blobs, and the record commits
  them only while the lease is still this worker's. A worker paused past its lease (the job queued
  again by housekeeping, or taken over by another delivery) finds its lease lost: the row stops at
  its next frame, the attempt's outputs are discarded, and nothing it wrote is served.

Batching (README.md, "Batched jobs on a GPU worker"): a delivery that starts its job also claims up
to `max_batch - 1` other queued jobs through their records (run lease first, then an atomic queued ->
running transition that counts their attempt) unless the worker's loop already runs, and hands them
all to that loop (worker.loop), which writes each job's outputs and final record when its row ends
(`JobRecords`). While the loop runs, rows that free up claim more queued jobs the same way. The
claimed jobs' own messages, delivered later here or elsewhere, find them final (or leased by the
loop, and come back later) and are acked without running; if this worker dies, those messages are
still queued or scheduled, the leases expire, and each job runs again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from personaplex.audio import encode_wav
from personaplex.errors import CancelledError, PersonaPlexError
from personaplex.jobs import Fence, Job, JobStatus, LeaseLost
from personaplex.params import FRAME_RATE, EngineResult, GenerationParams
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, completed_attempt
from worker.runtime import WorkerRuntime

if TYPE_CHECKING:
    from concurrent.futures import Future

    from personaplex.engine.batching import BatchRequest

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.25
"""Progress is published at most 4 times a second (plus every phase change and phase end)."""

CANCEL_CHECK_INTERVAL_S = 0.2
"""The Redis cancel flag is read at most 5 times a second, however fast frames go."""


CLAIM_LOOKAHEAD = 4
"""Queued ids read per free batch row when claiming (some may be leased or cancelled meanwhile)."""

UNRECORDED = "unrecorded"
"""A delivery's status for a job whose outcome could not be written (Redis failed as it ended)."""

LOST = "lost"
"""A delivery's status for a job whose lease it lost: another attempt owns the job now."""


class ProgressReporter:
    """The engine's progress callback: always updates gpu_status, publishes to Redis throttled."""

    def __init__(self, runtime: WorkerRuntime, job_id: str, fence: Fence) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.fence = fence
        self._last_phase: str | None = None
        self._last_sent = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        progress = {"phase": phase, "done": int(done), "total": int(total)}
        self.runtime.set_progress(self.job_id, progress)
        now = time.monotonic()
        if phase == self._last_phase and done < total and now - self._last_sent < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_phase, self._last_sent = phase, now
        try:
            self.runtime.jobs.set_progress(self.job_id, phase, done, total, fence=self.fence)
        except RedisError as exc:  # a Redis blip must not fail the batch: the next report catches up
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)


class CancelCheck:
    """The engine's should_cancel callback: stops the row when the job's lease is lost (checked every
    frame, in memory) or its cancel flag is set (read from Redis at most every 0.2 s)."""

    def __init__(self, runtime: WorkerRuntime, job_id: str) -> None:
        self.runtime = runtime
        self.jobs = runtime.jobs
        self.job_id = job_id
        self._next_check = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        if self.runtime.lease_lost(self.job_id):
            return True
        now = time.monotonic()
        if not self._cancelled and now >= self._next_check:
            self._next_check = now + CANCEL_CHECK_INTERVAL_S
            try:
                self._cancelled = self.jobs.cancel_requested(self.job_id)
            except RedisError as exc:  # unreadable flag: keep going, read it again next time
                log.warning("job %s: cancel flag unreadable (%s)", self.job_id, exc)
        return self._cancelled


@dataclass
class Outcome:
    """What one delivery did: the job's status afterwards and whether the engine ran."""

    status: str
    ran: bool = False
    retry_in: float | None = None
    """Seconds after which Celery should deliver the job again (another worker holds its lease)."""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "ran": self.ran}


class JobRunner:
    """Runs one delivery of one job on this worker: its job goes into the worker's loop."""

    def __init__(self, runtime: WorkerRuntime, job_id: str, worker: str) -> None:
        self.runtime = runtime
        self.jobs = runtime.jobs
        self.job_id = job_id
        self.worker = worker
        self.records = JobRecords(runtime, worker)

    def run(self) -> Outcome:
        job = self.jobs.get(self.job_id)
        if job is None or job.status.is_final:
            return self._skip(job)
        if not self.jobs.acquire_lease(job.id, self.runtime.lease_owner, self.runtime.settings.heartbeat_ttl):
            return self._come_back_later()
        try:
            with self.runtime.job_running(job.id):
                return self._start(job)
        finally:
            self.jobs.release_lease(job.id, self.runtime.lease_owner)

    def _skip(self, job: Job | None) -> Outcome:
        if job is None:
            log.warning("job %s does not exist (expired or never created): nothing to do", self.job_id)
            return Outcome("missing")
        log.info("job %s is already %s: not running it again", job.id, job.status.value)
        return Outcome(job.status.value)

    def _come_back_later(self) -> Outcome:
        """Another worker holds the run lease: skip a job that ended meanwhile, else check again later.

        Waiting here would hold this GPU's only task slot for as long as the other worker's batch
        runs. One lease TTL later the job is final, or its owner died and its lease has expired.
        """
        job = self.jobs.get(self.job_id)
        if job is None or job.status.is_final:
            return self._skip(job)
        settings = self.runtime.settings
        # The re-published message waits unacked until its countdown: keep that under the
        # visibility timeout, or kombu would restore it meanwhile.
        delay = min(settings.heartbeat_ttl, settings.visibility_timeout / 2)
        owner = self.jobs.lease_owner(job.id)
        log.info("job %s is being run by %s: delivering it again in %.0f s", job.id, owner, delay)
        return Outcome(job.status.value, retry_in=delay)

    def _start(self, job: Job) -> Outcome:
        if self.jobs.cancel_requested(job.id):
            self.jobs.mark_cancelled(job.id)
            return Outcome(JobStatus.CANCELLED.value)
        started = self.jobs.mark_running(job.id, self.worker)
        if started is None or started.status is not JobStatus.RUNNING:
            return self._skip(started)
        fence = self.runtime.started(job.id, started.attempts)
        max_attempts = self.runtime.settings.max_attempts
        try:
            if started.attempts > max_attempts:
                self.jobs.mark_failed(job.id, _gave_up(started.attempts - 1, max_attempts), fence)
                return Outcome(JobStatus.FAILED.value)
            earlier = completed_attempt(self.runtime.blobs, job.id, started.attempts)
            if earlier is not None:
                log.info("job %s: attempt %d's outputs are complete, finishing from them", job.id, earlier)
                result = self.records.result_from_outputs(job.id, earlier)
                self.jobs.mark_succeeded(job.id, result, fence)
                return Outcome(JobStatus.SUCCEEDED.value)
        except LeaseLost:
            return self.records.lost(started, ran=False)
        return self._run_engine(started)

    def _run_engine(self, job: Job) -> Outcome:
        """Hand the job, and the queued jobs this delivery claims beside it, to the worker's loop;
        the delivery ends (its message is acked) when its own job does."""
        claimed = self._claim_waiting(job)
        outcomes = self.runtime.loop(self.worker).run_jobs([job, *claimed])
        return outcomes[job.id].result()

    def _claim_waiting(self, leader: Job) -> list[Job]:
        """Take up to max_batch - 1 queued jobs (oldest first) to run beside this delivery's job.

        Jobs whose estimated frames would push the batch past max_batch_frames are left for other
        workers (a running loop takes them later, when it has room: see `LoopFeed`). A loop that
        already runs takes the queued jobs itself as its rows free up.
        """
        settings = self.runtime.settings
        if self.runtime.loop(self.worker).running:
            return []
        longest = frames_estimate(leader)

        def fits(candidate: Job, claimed: int) -> bool:
            nonlocal longest
            frames = max(longest, frames_estimate(candidate))
            if candidate.id == leader.id or (claimed + 2) * frames > settings.max_batch_frames:
                return False
            longest = frames
            return True

        claimed = self.records.claim_queued(settings.max_batch - 1, fits)
        if claimed:
            log.info("job %s: batched with queued jobs %s", leader.id, ", ".join(j.id for j in claimed))
        return claimed


@dataclass
class BatchRun:
    """One run of the worker's loop (from its first row until it drains): the jobs it took; the first
    names it in their results (`engine_batch`)."""

    leader: str | None = None
    size: int = 0

    def add(self, job: Job) -> None:
        self.leader = self.leader or job.id
        self.size += 1

    def describe(self) -> dict[str, Any]:
        return {"leader": self.leader, "size": self.size}


class JobRecords:
    """The jobs of this worker's loop through their records: claiming queued jobs, building each
    one's engine request, and writing its outputs and final record the moment its row ends."""

    def __init__(self, runtime: WorkerRuntime, worker: str) -> None:
        self.runtime = runtime
        self.jobs = runtime.jobs
        self.blobs = runtime.blobs
        self.worker = worker

    def claim_queued(
        self,
        room: int,
        fits: Callable[[Job, int], bool] | None = None,
        candidates: list[str] | None = None,
    ) -> list[Job]:
        """Claim up to `room` queued jobs, oldest first, into this worker's loop.

        Each claim takes the job's run lease first (so no other delivery runs it meanwhile), then
        moves it queued -> running atomically (counting its attempt); a job cancelled, started or
        leased elsewhere in between is skipped, and so is one `fits(job, claimed so far)` refuses.
        With nothing queued this is one Redis round trip. `candidates`: the queued ids, read already.
        """
        if room <= 0:
            return []
        claimed: list[Job] = []
        if candidates is None:
            candidates = self.jobs.queued_ids(room * CLAIM_LOOKAHEAD)
        for candidate in self.jobs.get_many(candidates):
            if len(claimed) >= room:
                break
            if fits is not None and not fits(candidate, len(claimed)):
                continue
            try:
                started = self._claim_one(candidate)
            except RedisError:
                self.runtime.leave_batch(candidate.id)  # its lease expires; housekeeping recovers it
                if claimed:
                    break  # the jobs claimed so far are this batch's: keep them
                raise
            if started is not None:
                claimed.append(started)
        return claimed

    def _claim_one(self, candidate: Job) -> Job | None:
        """Lease, then queued -> running (its attempt counted); None if it went elsewhere meanwhile."""
        settings = self.runtime.settings
        owner, ttl = self.runtime.lease_owner, settings.heartbeat_ttl
        if self.jobs.cancel_requested(candidate.id) or not self.jobs.acquire_lease(candidate.id, owner, ttl):
            return None
        self.runtime.add_to_batch(candidate.id)
        started = self.jobs.claim(candidate.id, self.worker)
        if started is None:
            self.release(candidate.id)
            return None
        fence = self.runtime.started(started.id, started.attempts)
        if started.attempts > settings.max_attempts:
            with contextlib.suppress(LeaseLost):
                self.jobs.mark_failed(
                    started.id, _gave_up(started.attempts - 1, settings.max_attempts), fence
                )
            self.release(started.id)
            return None
        return started

    def release(self, job_id: str) -> None:
        self.runtime.leave_batch(job_id)
        self.jobs.release_lease(job_id, self.runtime.lease_owner)

    def request(
        self, job: Job, run: BatchRun, done: Future[Outcome], load_s: float = 0.0
    ) -> BatchRequest | None:
        """The engine's request for one job of `run` (its audio, parameters, progress and cancel
        check, and the on_done that records it and resolves `done`); None when its input does not
        read back, and the job has failed (`done` says so). `load_s`: the model load it waited for."""
        from personaplex.engine.core import BatchRequest

        run.add(job)
        try:
            audio = self.blobs.get(job.id, INPUT)
            params = GenerationParams.from_dict(job.params)
        except Exception as exc:
            done.set_result(self.settle(job, run, exc, load_s))
            return None
        reporter = ProgressReporter(self.runtime, job.id, self._fence(job))
        reporter("load", 0, 1)

        def on_done(outcome: EngineResult | Exception) -> None:
            done.set_result(self.settle(job, run, outcome, load_s))

        return BatchRequest(audio, params, reporter, CancelCheck(self.runtime, job.id), on_done)

    def settle(
        self, job: Job, run: BatchRun, outcome: EngineResult | Exception, load_s: float = 0.0
    ) -> Outcome:
        """Record one job's end (outputs and success, or the reason it failed or was cancelled) and
        let its lease go: a later delivery of it finds it final."""
        try:
            status = self._record(job, run, outcome, load_s)
        except LeaseLost:
            status = self.lost(job).status
        except Exception:  # Redis went away as it ended: its lease expires and it is queued again
            log.exception("job %s: its outcome was not recorded", job.id)
            status = UNRECORDED
        self.runtime.leave_batch(job.id)
        try:
            self.jobs.release_lease(job.id, self.runtime.lease_owner)
        except RedisError as exc:  # it expires within the heartbeat TTL
            log.warning("job %s: its lease was not released (%s)", job.id, exc)
        log.info("job %s (in the loop of %s) ended %s", job.id, run.leader, status)
        return Outcome(status, ran=True)

    def _record(self, job: Job, run: BatchRun, outcome: EngineResult | Exception, load_s: float) -> str:
        """Write the attempt's outcome under its fence; raises LeaseLost if the job moved on."""
        fence = self._fence(job)
        if self.runtime.lease_lost(job.id):
            raise LeaseLost(f"job {job.id}: attempt {fence.attempt} lost its lease")
        if isinstance(outcome, CancelledError):
            self.jobs.mark_cancelled(job.id, fence)
            return JobStatus.CANCELLED.value
        if isinstance(outcome, PersonaPlexError):
            self.jobs.mark_failed(job.id, str(outcome), fence)
            return JobStatus.FAILED.value
        if isinstance(outcome, FileNotFoundError):
            self.jobs.mark_failed(job.id, "The job's input is missing from the blob store (expired?).", fence)
            return JobStatus.FAILED.value
        try:
            if isinstance(outcome, Exception):
                raise outcome
            inference_s = outcome.timings.total_s - outcome.timings.load_s
            timings = _timings(job, outcome, load_s, inference_s)
            self._write_outputs(job.id, fence.attempt, outcome, timings)
            result = _result(outcome.input_duration_s, outcome.text, outcome.frames, timings, fence.attempt)
            if run.size > 1:
                result["engine_batch"] = run.describe()
        except Exception as exc:
            log.error("job %s failed unexpectedly", job.id, exc_info=exc)
            self.jobs.mark_failed(job.id, f"Internal error: {type(exc).__name__}: {exc}", fence)
            return JobStatus.FAILED.value
        self.jobs.mark_succeeded(job.id, result, fence)
        return JobStatus.SUCCEEDED.value

    def _fence(self, job: Job) -> Fence:
        return Fence(self.runtime.lease_owner, job.attempts)

    def lost(self, job: Job, ran: bool = True) -> Outcome:
        """This attempt lost the job to another: leave its record alone and drop its outputs."""
        log.warning(
            "job %s: attempt %d lost its lease (the job was queued again or taken over); "
            "its outputs are discarded and its outcome not recorded",
            job.id,
            job.attempts,
        )
        try:
            self.blobs.discard_attempt(job.id, job.attempts)
        except Exception as exc:  # an orphan no record points to: the job's retention removes it
            log.warning("job %s: attempt %d's outputs not discarded (%s)", job.id, job.attempts, exc)
        return Outcome(LOST, ran=ran)

    def _write_outputs(
        self, job_id: str, attempt: int, result: EngineResult, timings: dict[str, float | bool]
    ) -> None:
        """The attempt's own WAV first, JSON last: a complete pair means the attempt finished (see
        completed_attempt); the record then commits them under the fence."""
        self.blobs.put(job_id, OUTPUT_WAV, encode_wav(result.audio, result.sample_rate), attempt)
        document = {"job_id": job_id, **result.text_document(), "timings": timings}
        self.blobs.put(job_id, OUTPUT_JSON, json.dumps(document).encode(), attempt)

    def result_from_outputs(self, job_id: str, attempt: int) -> dict[str, Any]:
        document = json.loads(self.blobs.get(job_id, OUTPUT_JSON, attempt))
        frames = len(document["frames"])
        return _result(document["duration_s"], document["text"], frames, document["timings"], attempt)


def _timings(job: Job, result: EngineResult, load_s: float, inference_s: float) -> dict[str, float | bool]:
    """The engine's phase timings plus the service's: queue wait, model load, inference and RTF."""
    duration = result.input_duration_s
    queue_wait = (job.started_at or time.time()) - job.created_at
    return {
        **result.timings.to_dict(),
        "queue_wait_s": round(max(queue_wait, 0.0), 6),
        "load_s": round(load_s, 6),
        "inference_s": round(inference_s, 6),
        "rtf": round(inference_s / duration, 6) if duration else 0.0,
    }


def frames_estimate(job: Job) -> int:
    """The job's generate frames from its recorded input duration (its prompt frames come on top)."""
    return math.ceil((job.input_duration_s or 0.0) * FRAME_RATE)


def _result(
    duration_s: float, text: str, frames: int, timings: dict[str, float], attempt: int
) -> dict[str, Any]:
    """The succeeded record's result; `attempt` names the outputs it commits (storage.read_output)."""
    return {"duration_s": duration_s, "text": text, "frames": frames, "timings": timings, "attempt": attempt}


def _gave_up(attempts: int, max_attempts: int) -> str:
    return (
        f"Gave up after {attempts} attempts (PERSONAPLEX_MAX_ATTEMPTS={max_attempts}): the job was "
        "delivered again each time its worker stopped before finishing it."
    )
