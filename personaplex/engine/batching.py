"""Several jobs stepped together in one FastLoop: which jobs share a batch, and the segment driver.

A batch's rows are `BatchRow`s. `step_rows` runs them in segments that end where some row's prompt
or whole plan ends, so each job's phase timings are measured there (one device sync per segment,
none per frame). A row that ends is handed back at once, decoded by the caller while the others go
on; a cancelled row leaves at its next frame (it is masked: the loop's shapes are static).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.engine.fast import FastLoop, JobPlan
from personaplex.errors import CancelledError
from personaplex.params import EngineResult, GenerationParams, Timings

Progress = Callable[[str, int, int], None]
ShouldCancel = Callable[[], bool]
Outcome = EngineResult | Exception
OnDone = Callable[[Outcome], None]

PROGRESS_EVERY = 5
"""Frames between progress callbacks."""


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

    audio: audio_io.AudioSource
    params: GenerationParams = field(default_factory=GenerationParams)
    progress: Progress | None = None
    should_cancel: ShouldCancel | None = None
    on_done: OnDone | None = None


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


def step_rows(
    loop: FastLoop,
    rows: list[BatchRow],
    ended: Callable[[BatchRow, torch.Tensor], None],
    cancelled: Callable[[BatchRow, CancelledError], None],
) -> None:
    """Step `rows` (loaded into `loop`) until each has ended (`ended(row, frames [F, 9])`) or been
    cancelled (`cancelled(row, error)`)."""
    sync = torch.cuda.synchronize if loop.device.type == "cuda" else (lambda: None)
    live = list(rows)
    done = 0  # frames every row has been stepped
    clock = time.perf_counter()
    while live:
        stop = min(e for row in live for e in (row.plan.prompt_frames, len(row.plan)) if e > done)
        before = functools.partial(_drop_cancelled, live, done, cancelled)
        done += loop.run(stop - done, before)
        sync()
        finished = _mark_phases(live, done, time.perf_counter() - clock)
        if finished:
            outputs = loop.results()
            for row in finished:
                live.remove(row)
                ended(row, outputs[rows.index(row)])


def _drop_cancelled(
    live: list[BatchRow], start: int, cancelled: Callable[[BatchRow, CancelledError], None], offset: int
) -> bool:
    """Before frame start + offset: report progress, take cancelled rows out; True if any left."""
    t = start + offset
    dropped = [row for row in live if row.cancelled()]
    for row in live:
        if row not in dropped:
            phase, index, total = row.phase_at(t)
            if index % PROGRESS_EVERY == 0:
                row.report(phase, index, total)
    for row in dropped:
        live.remove(row)
        cancelled(row, CancelledError(row.cancel_message(t)))
    return bool(dropped)


def _mark_phases(live: list[BatchRow], done: int, elapsed: float) -> list[BatchRow]:
    """Record the phase timings of rows whose prompt or plan ends at `done`; returns those that ended."""
    finished = []
    for row in live:
        plan, timings = row.plan, row.timings
        if done == plan.prompt_frames:
            timings.prompt_s = elapsed
            row.report("prompt", plan.prompt_frames, plan.prompt_frames)
        if done == len(plan):
            timings.generate_s = elapsed - timings.prompt_s
            row.report("generate", plan.generate_frames, plan.generate_frames)
            finished.append(row)
    return finished
