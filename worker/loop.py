"""The worker's one engine loop, on a thread of its own, for jobs and live conversations alike.

Every row of this GPU runs in one continuous `Engine.process_batch` on this thread:
- a delivery of `process_audio` hands its job (and the queued jobs it claimed beside it) in with
  `run_jobs` and waits for its own job's outcome, so a delivery that arrives while the loop runs
  joins it at the next frame boundary instead of waiting for the engine;
- while the loop runs, rows that free up claim queued jobs through their records (`LoopFeed`, one
  Redis round trip a look): at the next frame once work is announced (worker.arrivals), and every
  REFILL_CHECK_INTERVAL_S without news;
- live conversations waiting in Redis (personaplex.conversations) are taken into free live slots
  (`PERSONAPLEX_MAX_LIVE`), the loop running or not: an idle loop looks every IDLE_LOOK_S, so the
  loop needs no batch job to exist.

The loop runs while any row is busy and the feed has more; then it waits for the next job or
conversation. `stop` drains it: no new rows, conversations told the worker is stopping, running jobs
finished.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from personaplex.conversations import CLOSE_SERVER_ERROR, Admitted, Conversations, RedisLink
from personaplex.engine.batching import REFILL_CHECK_INTERVAL_S
from personaplex.errors import ConversationError
from personaplex.jobs import Job, Keys
from personaplex.params import FRAME_RATE, EngineResult
from worker.arrivals import ArrivalWatch
from worker.runner import CLAIM_LOOKAHEAD, BatchRun, JobRecords, Outcome, frames_estimate
from worker.runtime import WorkerRuntime

if TYPE_CHECKING:
    from personaplex.engine.batching import BatchRequest

log = logging.getLogger(__name__)

IDLE_LOOK_S = 0.05
"""How often an idle loop looks for a waiting conversation (one ZCARD): it takes one within 100 ms."""

KEEPALIVE_EVERY_S = 0.5
"""How often the worker renews its conversations' alive keys (their TTL is LIVE_ALIVE_TTL_S)."""

STOPPING = "The worker is shutting down: call again to be served by another."


@dataclass
class Handed:
    """A job a delivery handed to the loop, and where its outcome goes."""

    job: Job
    done: Future[Outcome]


class EngineLoop:
    """The thread that owns the worker's engine loop (see the module docstring)."""

    def __init__(self, runtime: WorkerRuntime, worker: str) -> None:
        self.runtime = runtime
        self.worker = worker
        self.records = JobRecords(runtime, worker)
        self.conversations = Conversations(runtime.redis)
        self.live: dict[str, RedisLink | None] = {}
        """The conversations this worker took, by id, with their row's link once it exists (the
        engine thread adds them as it takes them, on_done removes them); their alive keys are renewed."""
        self._live_lock = threading.Lock()
        self._handed: queue.SimpleQueue[Handed] = queue.SimpleQueue()
        self._wake = threading.Event()
        self.arrivals = ArrivalWatch(runtime.redis, on_heard=self._wake.set)
        self._stopping = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"engine-loop-{worker}", daemon=True)
        self._keepalive = threading.Thread(target=self._renew, name=f"live-keepalive-{worker}", daemon=True)
        self._started = False
        self._start_lock = threading.Lock()

    # ---- the worker's side --------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if not self._started:
                self._started = True
                self._thread.start()
                self._keepalive.start()
                self.arrivals.start()

    @property
    def running(self) -> bool:
        """Whether the engine loop is running now (some row is busy)."""
        return self._running.is_set()

    def run_jobs(self, jobs: list[Job]) -> dict[str, Future[Outcome]]:
        """Hand running jobs (leased, attempt counted) to the loop; each one's outcome, when it ends."""
        self.start()
        outcomes: dict[str, Future[Outcome]] = {}
        for job in jobs:
            handed = Handed(job, Future())
            outcomes[job.id] = handed.done
            self._handed.put(handed)
        self._wake.set()
        return outcomes

    def live_count(self) -> int:
        with self._live_lock:
            return len(self.live)

    def live_slots_free(self) -> int:
        """Conversations it can take now: none while it stops or an offload waits for the loop."""
        if self._stopping.is_set() or not self.runtime.admits_jobs:
            return 0
        return max(self.runtime.settings.max_live - self.live_count(), 0)

    def stop(self, timeout: float | None = None) -> None:
        """Drain: take nothing new, end the conversations, let the running jobs finish (up to `timeout`)."""
        self._stopping.set()
        with self._live_lock:
            links = [link for link in self.live.values() if link is not None]
        for link in links:
            link.stop(STOPPING)
        self._wake.set()
        if self._started:
            self._thread.join(timeout)
            self.arrivals.stop()

    # ---- the loop's thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        while not (self._stopping.is_set() and self._handed.empty()):
            try:
                if self._work_waiting():
                    self._run_once()
            except Exception:  # Redis went away mid-admission, ...: the thread must go on
                log.exception("the engine loop's thread hit an error; going on")
                time.sleep(1.0)

    def _work_waiting(self) -> bool:
        """Wait up to IDLE_LOOK_S for a handed job; else whether a conversation waits for a slot."""
        if self._handed.empty():
            self._wake.wait(IDLE_LOOK_S)
            self._wake.clear()
        if not self._handed.empty():
            return True
        if not self.live_slots_free() or not self.runtime.admits_jobs:
            return False
        try:
            return self.conversations.waiting() > 0
        except RedisError as exc:
            log.warning("could not look for waiting conversations (%s)", exc)
            time.sleep(1.0)
            return False

    def _run_once(self) -> None:
        """One run of the loop: from its first rows until no row is busy and nothing more waits."""
        run = BatchRun()
        feed = LoopFeed(self, run)
        with self.runtime.loop_running():
            self._running.set()
            try:
                self._run_rows(feed)
            except Exception as exc:  # the model did not load, the loop broke: every row left fails
                log.exception("the engine loop of %s failed", run.leader)
                feed.fail_all(exc)
            finally:
                self._running.clear()
                feed.settle_leftovers()

    def _run_rows(self, feed: LoopFeed) -> None:
        rows = self.runtime.settings.max_batch
        # Conversations alone are taken first, so they learn at once that a worker has them (their
        # row's session then loads the model, if it is not resident).
        first = feed.conversations(rows) if self._handed.empty() else []
        if not first and self._handed.empty():
            return  # another worker took the conversation: nothing to load the model for
        feed.load_s = self.runtime.ensure_loaded()
        first += feed.take(rows - len(first))
        if first:
            self.runtime.engine().process_batch(first, feed)

    # ---- conversations --------------------------------------------------------------------------
    def take_conversations(self, count: int) -> list[Admitted]:
        """Up to `count` waiting conversations, now this worker's (their alive keys renewed from now)."""
        taken = self.conversations.take(self.worker, count)
        with self._live_lock:
            for admitted in taken:
                self.live[admitted.session_id] = None
        if taken:
            try:
                self.conversations.keep_alive([admitted.session_id for admitted in taken])
            except RedisError as exc:  # the keepalive thread renews them within 0.5 s
                log.warning("conversations' alive keys not set yet (%s)", exc)
        return taken

    def admit(self, admitted: Admitted) -> BatchRequest | None:
        """A conversation taken from the waiting line, as its row's request (None if it cannot start)."""
        from personaplex.engine.core import BatchRequest

        engine = self.runtime.engine()
        try:
            link = RedisLink(self.conversations, admitted.session_id, engine.live_session())
        except Exception as exc:
            self.not_started(admitted.session_id, exc)
            return None
        with self._live_lock:
            self.live[admitted.session_id] = link
        if self._stopping.is_set():  # stop() ran while its session was made
            link.stop(STOPPING)
        log.info("conversation %s joins the loop", admitted.session_id)

        def on_done(outcome: EngineResult | Exception) -> None:
            self._conversation_ended(admitted.session_id, link, outcome)

        frames = engine.live_frames or math.ceil(self.runtime.settings.max_live_seconds * FRAME_RATE)
        return BatchRequest(None, admitted.params, on_done=on_done, live=link, live_frames=frames)

    def not_started(self, session_id: str, exc: Exception) -> None:
        """A conversation taken that gets no row: its caller is told why, its slot is free again."""
        with self._live_lock:
            self.live.pop(session_id, None)
        error = f"The conversation could not start: {exc}"
        try:
            self.conversations.send_end(session_id, error, CLOSE_SERVER_ERROR)
        except RedisError as lost:  # its caller sees the alive key go
            log.warning("conversation %s: its failure was not sent (%s)", session_id, lost)

    def _conversation_ended(
        self, session_id: str, link: RedisLink, outcome: EngineResult | Exception
    ) -> None:
        with self._live_lock:
            self.live.pop(session_id, None)
        if isinstance(outcome, ConversationError):
            reason, code = str(outcome), CLOSE_SERVER_ERROR
        elif isinstance(outcome, Exception):
            reason, code = f"The conversation failed: {outcome}", CLOSE_SERVER_ERROR
        else:
            reason, code = link.ending(self.runtime.settings.max_live_seconds)
        try:
            link.finish(reason, code)
        except RedisError as exc:  # its caller sees the alive key go, and ends it
            log.warning("conversation %s: its end was not sent (%s)", session_id, exc)
        log.info("conversation %s left the loop%s", session_id, f": {reason}" if reason else "")

    def _renew(self) -> None:
        """Keep the conversations' alive keys (their callers' sign that this worker still runs them)."""
        while True:
            with self._live_lock:
                ids = list(self.live)
            if ids:
                try:
                    self.conversations.keep_alive(ids)
                except RedisError as exc:
                    log.warning("conversations' alive keys not renewed (%s)", exc)
            if self._stopping.is_set() and not ids and not self._thread.is_alive():
                return
            time.sleep(KEEPALIVE_EVERY_S)


class LoopFeed:
    """The `JobFeed` of the worker's loop: jobs handed in by deliveries first, then waiting
    conversations into free live slots, then queued jobs claimed through their records."""

    def __init__(self, loop: EngineLoop, run: BatchRun) -> None:
        self.loop = loop
        self.run = run
        self.runtime = loop.runtime
        self.records = loop.records
        self.load_s = 0.0
        """The model load this run waited for: its first rows' timings count it."""
        self.taken: list[tuple[Job, Future[Outcome]]] = []
        self.next_look = time.monotonic() + REFILL_CHECK_INTERVAL_S

    def due(self) -> bool:
        if not self.loop._handed.empty():
            return True
        heard = self.loop.arrivals.heard() or time.monotonic() >= self.next_look
        return heard and self._admitting()

    def _admitting(self) -> bool:
        return self.runtime.admits_jobs and not self.loop._stopping.is_set()

    def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
        self.next_look = time.monotonic() + REFILL_CHECK_INTERVAL_S
        self.loop.arrivals.clear()
        requests: list[BatchRequest] = []
        while len(requests) < rows and not self.loop._handed.empty():
            handed = self.loop._handed.get()
            requests += self._requests([handed.job], [handed.done])
        if len(requests) < rows and self._admitting():
            requests += self._from_redis(rows - len(requests), max_frames)
        self.load_s = 0.0  # later rows joined a loaded model
        return requests

    def _from_redis(self, rows: int, max_frames: int | None) -> list[BatchRequest]:
        """Waiting conversations (their row frames within `max_frames`), then queued jobs."""
        try:
            queued, waiting = self._look(rows)
        except RedisError as exc:  # the running rows go on; the next look tries again
            log.warning("the loop of %s could not look at the queue (%s)", self.run.leader, exc)
            return []
        requests = []
        live_frames = self.runtime.engine().live_frames
        if waiting and (max_frames is None or live_frames <= max_frames):
            requests += self.conversations(rows)
        room = rows - len(requests)
        if queued and room > 0 and self.runtime.admits_jobs:
            requests += self._claim(room, max_frames, queued)
        return requests

    def _claim(self, room: int, max_frames: int | None, queued: list[str]) -> list[BatchRequest]:
        short_enough = None if max_frames is None else (lambda job, _: frames_estimate(job) <= max_frames)
        try:
            claimed = self.records.claim_queued(room, short_enough, candidates=queued)
        except RedisError as exc:
            log.warning("the loop of %s could not claim queued jobs (%s)", self.run.leader, exc)
            return []
        for job in claimed:
            log.info("job %s joins the running loop of %s", job.id, self.run.leader)
        return self._requests(claimed, [Future() for _ in claimed])

    def conversations(self, rows: int) -> list[BatchRequest]:
        """Up to `rows` waiting conversations (as many as the free live slots), as requests."""
        try:
            taken = self.loop.take_conversations(min(rows, self.loop.live_slots_free()))
        except RedisError as exc:  # they stay in line; the next look takes them
            log.warning("could not take waiting conversations (%s)", exc)
            return []
        return [request for request in map(self.loop.admit, taken) if request is not None]

    def _look(self, rows: int) -> tuple[list[str], int]:
        """Queued job ids and waiting conversations, in one round trip."""
        with self.runtime.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(Keys.QUEUED, 0, rows * CLAIM_LOOKAHEAD - 1)
            pipe.zcard(Keys.LIVE_WAITING)
            ids, waiting = pipe.execute()
        if not self.loop.live_slots_free():
            waiting = 0
        return [i.decode() if isinstance(i, bytes) else i for i in ids], int(waiting)

    def _requests(self, jobs: list[Job], outcomes: list[Future[Outcome]]) -> list[BatchRequest]:
        self.taken = [(job, done) for job, done in self.taken if not done.done()]  # a run may last hours
        requests = []
        for job, done in zip(jobs, outcomes, strict=True):
            self.taken.append((job, done))
            request = self.records.request(job, self.run, done, self.load_s)
            if request is not None:
                requests.append(request)
        return requests

    def fail_all(self, exc: Exception) -> None:
        """The loop broke: every job taken and not settled fails with `exc`, so do the conversations,
        and so do the jobs still handed in (their deliveries wait for them)."""
        while not self.loop._handed.empty():
            handed = self.loop._handed.get()
            self.taken.append((handed.job, handed.done))
        self._settle_open(exc)
        with self.loop._live_lock:
            links = list(self.loop.live.items())
        for session_id, link in links:
            if link is None:
                self.loop.not_started(session_id, exc)
            else:
                self.loop._conversation_ended(session_id, link, exc)

    def settle_leftovers(self) -> None:
        """After a run: a job it took whose outcome never came (an on_done that raised) fails, so its
        delivery never waits forever."""
        self._settle_open(RuntimeError("the loop ended without this job's outcome"))

    def _settle_open(self, exc: Exception) -> None:
        for job, done in self.taken:
            if not done.done():
                done.set_result(self.records.settle(job, self.run, exc))
