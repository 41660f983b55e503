"""Several jobs stepped together in one FastLoop: which jobs share a batch, and the segment driver.

A batch's rows are `BatchRow`s. `step_rows` runs them in segments that end where some row's prompt
or whole plan ends, so each job's phase timings are measured there (one device sync per segment,
none per frame). A row that ends is handed back at once, decoded by the caller while the others go
on; a cancelled row leaves at its next frame. Either frees its row of the loop, and with a `Joiner`
the driver refills free rows at frame boundaries while the others run (continuous batching): each
joining row counts its frames from its own start, so its job runs as it would alone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.engine.fast import FastLoop, JobPlan
from personaplex.errors import CancelledError, ConversationError
from personaplex.params import EngineResult, GenerationParams, Timings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
ShouldCancel = Callable[[], bool]
Outcome = EngineResult | Exception
OnDone = Callable[[Outcome], None]

PROGRESS_EVERY = 5
"""Frames between progress callbacks."""

REFILL_CHECK_INTERVAL_S = 0.5
"""How often the worker's loop with a free row looks for queued jobs and waiting conversations
without news (worker.loop.LoopFeed): work that is announced (worker.arrivals) is looked for at the
next frame; this look finds what an announcement lost while the worker's subscription was down
missed. A look is one round trip. Here, not in the worker, so benchmarks replay it without Celery."""


def no_progress(phase: str, done: int, total: int) -> None:
    """The progress callback of a caller that passed none."""


def never_cancelled() -> bool:
    """The cancel check of a caller that passed none."""
    return False


@dataclass
class BatchRequest:
    """One job of `Engine.process_batch`: its audio and parameters, and its own callbacks.

    `on_done` receives the job's EngineResult (or its exception) as soon as its row ends, before the
    batch does: a short job's outputs need not wait for the longest one.
    """

    audio: audio_io.AudioSource | None
    params: GenerationParams = field(default_factory=GenerationParams)
    progress: Progress | None = None
    should_cancel: ShouldCancel | None = None
    on_done: OnDone | None = None
    live: LiveLink | None = None
    """A live conversation instead of a recording: `audio` is unused, the row runs while the link is
    open (up to `live_frames`) and steps only when its next input frame has arrived."""
    live_frames: int = 0


class LiveLink(Protocol):
    """A live conversation's end of its row: its input frames as they arrive, its output frames out.

    Called from the loop's thread between frames; none of these may block for long.
    """

    def next_input(self) -> torch.Tensor | None:
        """The user codes [8] of its next frame, or None while that frame has not arrived."""
        ...

    def deliver(self, frame: torch.Tensor) -> None:
        """Its next generated frame [9] (text, then the agent's 8 codes), as soon as it is stepped."""
        ...

    def closed(self) -> bool:
        """Whether the conversation is over: its row leaves the loop."""
        ...

    def wait(self, timeout: float) -> None:
        """Block until input may have arrived, or `timeout` seconds (the loop has nothing else to do)."""
        ...

    def ready(self) -> None:
        """Its row has joined the loop, its prompt phase done: input is taken from now on."""
        ...


class JobFeed(Protocol):
    """More jobs for a running batch (the worker's queue): what makes `Engine.process_batch` continuous."""

    def due(self) -> bool:
        """Whether a look for more jobs is due (cheap: no I/O)."""
        ...

    def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
        """Up to `rows` more jobs, oldest first, now the batch's own; [] when none is waiting.

        With `max_frames`, only jobs of at most that many input frames (12.5 per second; estimated
        from their recorded duration is fine): the others stay queued for another loop or worker.
        """
        ...


def plan_groups(lengths: list[int], max_batch: int, max_frames: int) -> list[list[int]]:
    """Split jobs (their frame counts) into batches, longest first: each batch holds at most
    `max_batch` rows and rows x its longest row's frames <= `max_frames` (a longer job runs alone).
    Similar lengths share a batch, so rows that end early leave little idle. Returns index lists."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        if group and len(group) < max_batch and (len(group) + 1) * lengths[group[0]] <= max_frames:
            group.append(index)
        else:
            groups.append([index])
    return groups


def reuses_rows(loop_rows: int, jobs: int, graphs: bool) -> bool:
    """Whether a fast loop with `loop_rows` rows should run a batch of `jobs` (its spare rows idle).

    With CUDA graphs, yes for more than half its rows: a replay at a few more rows costs far less
    than a new capture, and the loop's memory was already held for a batch that size. Without
    graphs an idle row is pure waste, so the rows must match.
    """
    if jobs == loop_rows:
        return True
    return graphs and loop_rows / 2 < jobs < loop_rows


@dataclass(eq=False)  # rows are compared by identity: `live.remove(row)`
class BatchRow:
    """One row of a batch: the job's request index, its samples and plan, and its callbacks."""

    index: int
    samples: np.ndarray
    plan: JobPlan
    timings: Timings
    report: Progress = no_progress
    cancelled: ShouldCancel = never_cancelled
    prepare_s: float = 0.0
    """Seconds spent decoding the audio, loading the voice and planning (in total_s, no phase)."""
    slot: int = 0
    """Its row of the loop."""
    start: int = 0
    """Its own frame t is the loop's frame start + t (a prefilled row joins at its first generate frame)."""
    clock: float = 0.0
    """perf_counter() when it joined (its phase timings run from there)."""
    generate_clock: float = 0.0
    """perf_counter() when its generate phase began."""
    live: LiveLink | None = None
    """A live conversation's row (BatchRequest.live): it advances at its own pace, frame by frame."""
    next_user: torch.Tensor | None = None
    """A live row's input taken from its link and not yet stepped (a frame that did not run keeps it)."""

    def join(self, slot: int, loop_frame: int) -> None:
        """Take row `slot` of a loop at the loop's frame `loop_frame`."""
        self.slot, self.start = slot, loop_frame - self.plan.first_frame
        self.clock = self.generate_clock = time.perf_counter()

    def phase_at(self, t: int) -> tuple[str, int, int]:
        """(phase, frame within it, frames in it) of the row's frame t."""
        prompt = self.plan.prompt_frames
        if t < prompt:
            return "prompt", t, prompt
        return "generate", t - prompt, self.plan.generate_frames

    def cancel_message(self, t: int) -> str:
        phase, index, total = self.phase_at(t)
        if phase == "prompt":
            return "Cancelled during the prompt phase."
        return f"Cancelled at frame {index} of {total}."


class Joiner(Protocol):
    """Where a running loop's free rows find more jobs (see `step_rows`)."""

    def due(self) -> bool:
        """Whether asking for more is worth it now; cheap, called before frames while a row is free."""
        ...

    def join(
        self, free: int, fits: Callable[[JobPlan], bool], horizon: int, wait: bool = False
    ) -> list[BatchRow]:
        """Up to `free` prepared rows, oldest first, each of which `fits` the loop; [] if none.
        `horizon`: frames until the loop's busy rows have all ended (see `FeedJoiner`). `wait`: the
        loop has no busy row, so block for jobs still being prepared rather than return []."""
        ...


def step_rows(
    loop: FastLoop,
    rows: list[BatchRow],
    ended: Callable[[BatchRow, torch.Tensor], None],
    cancelled: Callable[[BatchRow, Exception], None],
    joiner: Joiner | None = None,
) -> None:
    """Step `rows` (loaded into `loop`, in order) until each has ended (`ended(row, frames [F, 9])`)
    or been cancelled (`cancelled(row, error)`); with a `joiner`, free rows take its jobs as they
    come, and the loop runs until no row is busy and the joiner has nothing more.

    While a live row is in the loop, the loop steps one frame at a time: before each frame a live
    row whose next input has arrived is fed it (the others are paused), after it that row's output
    frame goes out. A live row ends (`ended` with its frames) when its link closes or its row is full;
    a link that fails ends its row alone (`cancelled` with a ConversationError)."""
    sync = torch.cuda.synchronize if loop.device.type == "cuda" else (lambda: None)
    live = list(rows)
    done = 0  # frames the loop has stepped
    for slot, row in enumerate(rows):
        _join(row, slot, 0)
    while True:
        if joiner is not None and loop.free_rows() and (not live or joiner.due()):
            _admit(loop, live, done, joiner, wait=not live)
        for row in _closed_live_rows(loop, live):
            frames = loop.row_result(row.slot)[: loop.t_host[row.slot] - row.plan.prompt_frames]
            _leave(loop, live, row)
            ended(row, frames)
        if not live:
            return
        for row, error in _feed_live_rows(loop, live):
            _leave(loop, live, row)
            cancelled(row, error)
        talking = [(row, loop.t_host[row.slot]) for row in live if row.next_user is not None]
        jobs = [row for row in live if row.live is None]
        if not jobs and not talking:
            live[0].live.wait(LIVE_IDLE_WAIT_S)  # type: ignore[union-attr]
            continue
        stop = done + 1 if len(jobs) < len(live) else _next_boundary(jobs, done)
        before = functools.partial(_before_frame, loop, live, done, cancelled, joiner)
        stepped = loop.run(stop - done, before)
        done += stepped
        sync()
        for row, error in _deliver(loop, live, talking) if stepped else ():
            _leave(loop, live, row)
            cancelled(row, error)
        for row in _mark_phases(jobs, done):
            frames = loop.row_result(row.slot)
            _leave(loop, live, row)
            ended(row, frames)


def _leave(loop: FastLoop, live: list[BatchRow], row: BatchRow) -> None:
    """Take `row` out of the running rows and free its row of the loop."""
    live.remove(row)
    loop.free_row(row.slot)


LIVE_IDLE_WAIT_S = 0.005
"""How long a loop with only live rows, none of whose input has arrived, waits before looking again."""


def _next_boundary(rows: list[BatchRow], done: int) -> int:
    """The loop frame where the next row's prompt or plan ends."""
    return min(
        row.start + e for row in rows for e in (row.plan.prompt_frames, len(row.plan)) if row.start + e > done
    )


def _closed_live_rows(loop: FastLoop, rows: list[BatchRow]) -> list[BatchRow]:
    return [
        row
        for row in rows
        if row.live is not None and (row.live.closed() or loop.t_host[row.slot] >= len(row.plan))
    ]


def _feed_live_rows(loop: FastLoop, rows: list[BatchRow]) -> list[tuple[BatchRow, ConversationError]]:
    """Feed each live row its next input frame, if it has arrived (or the one a frame that did not
    run left it), and pause the others; returns the rows whose link failed, with why."""
    failed = []
    for row in rows:
        if row.live is None:
            continue
        try:
            if row.next_user is None:
                row.next_user = row.live.next_input()
        except Exception as exc:
            failed.append((row, _broken(exc)))
            continue
        loop.pause(row.slot, row.next_user is None)
        if row.next_user is not None:
            loop.feed(row.slot, loop.t_host[row.slot], row.next_user)
    return failed


def _deliver(
    loop: FastLoop, rows: list[BatchRow], talking: list[tuple[BatchRow, int]]
) -> list[tuple[BatchRow, ConversationError]]:
    """Hand each live row that stepped its output frame; returns the rows whose link failed, with why."""
    failed = []
    for row, t in talking:
        if row not in rows:
            continue  # cancelled before the frame
        row.next_user = None
        try:
            row.live.deliver(loop.frame_at(row.slot, t))  # type: ignore[union-attr]
        except Exception as exc:
            failed.append((row, _broken(exc)))
    return failed


def _broken(exc: Exception) -> ConversationError:
    """What a conversation whose link raised `exc` ends with (logged: its row leaves alone)."""
    log.error("a live conversation's link failed: %s", exc, exc_info=exc)
    return ConversationError(f"The conversation broke off: {exc}")


def _admit(loop: FastLoop, live: list[BatchRow], done: int, joiner: Joiner, wait: bool) -> None:
    free = len(loop.free_rows())
    for row in joiner.join(free, lambda plan: loop.fits([plan]), loop.horizon(), wait):
        slot = loop.free_rows()[0]
        loop.load_row(slot, row.plan)
        _join(row, slot, done)
        live.append(row)


def _join(row: BatchRow, slot: int, loop_frame: int) -> None:
    """`row` takes row `slot` of the loop (its schedules already loaded) at the loop's frame
    `loop_frame`; a conversation is told its row is ready."""
    row.join(slot, loop_frame)
    if row.live is not None:
        row.live.ready()


def _before_frame(
    loop: FastLoop,
    live: list[BatchRow],
    start: int,
    cancelled: Callable[[BatchRow, Exception], None],
    joiner: Joiner | None,
    offset: int,
) -> bool:
    """Before the loop's frame start + offset: report progress, take cancelled rows out; True (end
    the segment) if any left, or if a free row should ask the joiner for a job."""
    t = start + offset
    dropped = [row for row in live if row.cancelled()]
    for row in live:
        if row not in dropped:
            phase, index, total = row.phase_at(t - row.start)
            if index % PROGRESS_EVERY == 0:
                row.report(phase, index, total)
    for row in dropped:
        _leave(loop, live, row)
        cancelled(row, CancelledError(row.cancel_message(t - row.start)))
    refill = joiner is not None and offset > 0 and bool(loop.free_rows()) and joiner.due()
    return bool(dropped) or refill


def _mark_phases(live: list[BatchRow], done: int) -> list[BatchRow]:
    """Record the phase timings of rows whose prompt or plan ends at the loop's frame `done`;
    returns those that ended."""
    finished = []
    now = time.perf_counter()
    for row in live:
        plan, timings, t = row.plan, row.timings, done - row.start
        if t == plan.prompt_frames and plan.prompt is None:
            timings.prompt_s = now - row.clock
            row.generate_clock = now
            row.report("prompt", plan.prompt_frames, plan.prompt_frames)
        if t == len(plan):
            timings.generate_s = now - row.generate_clock
            row.report("generate", plan.generate_frames, plan.generate_frames)
            finished.append(row)
    return finished


class FeedJoiner:
    """The `Joiner` of a continuous batch: rows prepared and waiting (`queue`, oldest first), then
    jobs taken from a `JobFeed` and prepared (`prepare` settles one that cannot start, returning None).

    Jobs taken are prepared on the `preparer` (one thread) while the loop runs on: decoding
    a recording, encoding it with Mimi and prefilling its prompt take a long job's arrival seconds
    of CPU (or a GPU's encode), which would otherwise stall every running row. They join in the
    order they were taken, once prepared.

    First come, first served, with backfilling: when the oldest waiting row does not fit the running
    loop (longer than its frame capacity), it is `held` for the next loop, which starts when this one
    drains and is sized for it. Until then a newer row may pass it only if it ends within the
    loop's horizon (the frames its busy rows still run): it fills a free row without delaying the
    held one, so no job waits behind a stream of newer ones, and a short question does not wait for
    a long recording that was only waiting itself.
    """

    def __init__(
        self,
        queue: list[BatchRow],
        feed: JobFeed | None,
        prepare: Callable[[BatchRequest], BatchRow | None],
        preparer: Executor,
    ) -> None:
        self.queue = queue
        self.feed = feed
        self.prepare = prepare
        self.preparer = preparer
        self.preparing: deque[Future[BatchRow | None]] = deque()
        """Jobs taken and being prepared, in the order taken."""
        self.held = False

    def due(self) -> bool:
        if self.feed is not None and self.feed.due():
            return True
        if self.preparing and self.preparing[0].done():
            return True
        return bool(self.queue) and not self.held  # rows left waiting behind a held one wait for a look

    def join(
        self, free: int, fits: Callable[[JobPlan], bool], horizon: int, wait: bool = False
    ) -> list[BatchRow]:
        rows: list[BatchRow] = []
        fetched = False
        while len(rows) < free:
            self._collect(block=False)
            row = self._next(fits, horizon)
            if row is not None:
                rows.append(row)
                continue
            room = free - len(rows) - len(self.preparing)
            if not fetched and room > 0 and self._fetch(room, horizon if self.held else None):
                fetched = True
                continue
            fetched = True
            if not (wait and not rows and self.preparing):
                break
            self._collect(block=True)
        return rows

    def drain(self) -> None:
        """Wait for every job being prepared: each is then in `queue`, or settled."""
        while self.preparing:
            self._collect(block=True)

    def _collect(self, block: bool) -> None:
        """Move prepared jobs, in the order taken, into the queue; with `block`, wait for the next."""
        while self.preparing and (block or self.preparing[0].done()):
            block = False
            try:
                row = self.preparing.popleft().result()
            except Exception:  # `prepare` settles what fails; this is a bug of its own
                log.exception("preparing a job that joins the batch failed")
                continue
            if row is not None:
                self.queue.append(row)

    def _next(self, fits: Callable[[JobPlan], bool], horizon: int) -> BatchRow | None:
        """The oldest waiting row that may join now, out of the queue; holds the oldest if it cannot."""
        for index, row in enumerate(self.queue):
            if index == 0 and not self.held:
                if fits(row.plan):
                    return self.queue.pop(0)
                self.held = True
            elif index > 0 and fits(row.plan) and row.plan.frames_to_run <= horizon:
                return self.queue.pop(index)
        return None

    def _fetch(self, count: int, max_frames: int | None) -> bool:
        if self.feed is None:
            return False
        try:
            requests = self.feed.take(count, max_frames)
        except Exception:  # the running rows must not pay for it: they go on, and it is asked again
            log.exception("the batch's feed failed")
            return False
        for request in requests:
            self.preparing.append(self.preparer.submit(self.prepare, request))
        self._collect(block=False)
        return bool(requests)
