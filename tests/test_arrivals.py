"""Announced work: a running loop with a free row looks for a job as soon as it is queued.

Real parts: the test's private redis-server, a real `WorkerRuntime` and `EngineLoop` (its
engine thread not started: the feed is asked directly, as the loop asks it before a frame), jobs
queued through the job store and conversations opened through `Conversations`, as the web does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures import Queue, RedisServer, speech_clip, wait_until

from personaplex.conversations import Conversations
from personaplex.jobs import JobStatus
from personaplex.params import GenerationParams
from personaplex.settings import Settings
from worker.loop import EngineLoop, LoopFeed
from worker.runner import BatchRun
from worker.runtime import WorkerRuntime


@pytest.fixture
def loop(settings: Settings, tiny_checkpoint: Path) -> Iterator[EngineLoop]:
    runtime = WorkerRuntime(replace(settings, model=str(tiny_checkpoint), device="cpu"))
    loop = EngineLoop(runtime, "gpu0@test")
    loop.arrivals.start()
    wait_until(lambda: loop.arrivals.subscribed, 10, what="the arrivals subscription")
    yield loop
    loop.arrivals.stop()


def quiet_feed(loop: EngineLoop) -> LoopFeed:
    """The loop's feed, its fallback look an hour away: only an announcement makes it due."""
    feed = LoopFeed(loop, BatchRun())
    feed.next_look = time.monotonic() + 3600.0
    loop.arrivals.clear()
    return feed


def test_a_queued_job_makes_the_running_loop_look_before_its_next_look(
    loop: EngineLoop, queue: Queue
) -> None:
    feed = quiet_feed(loop)
    assert not feed.due()
    job = queue.submit(speech_clip(1.0), GenerationParams(seed=1))
    wait_until(feed.due, 10, what="the loop hearing the job's arrival")
    [request] = feed.take(2)
    assert request.params.seed == 1
    assert queue.jobs.get(job.id).status is JobStatus.RUNNING  # claimed by this look
    assert not loop.arrivals.heard(), "a look answers the announcements before it"


def test_a_conversation_asking_for_a_row_is_announced(loop: EngineLoop) -> None:
    feed = quiet_feed(loop)
    Conversations(loop.runtime.redis).open(GenerationParams())
    wait_until(feed.due, 10, what="the loop hearing the conversation")


def test_the_watch_hears_again_once_redis_is_back(loop: EngineLoop, redis_server: RedisServer) -> None:
    redis_server.stop()
    wait_until(lambda: not loop.arrivals.subscribed, 10, what="the subscription to drop")
    redis_server.start()
    wait_until(lambda: loop.arrivals.subscribed, 15, what="the subscription to come back")
    assert loop.arrivals.heard(), "what was queued while it could not hear is looked for"
    feed = quiet_feed(loop)
    Conversations(loop.runtime.redis).open(GenerationParams())
    wait_until(feed.due, 10, what="the loop hearing the conversation")


def test_a_loop_that_takes_no_jobs_does_not_look_when_it_hears(loop: EngineLoop, queue: Queue) -> None:
    """An offload waiting for the loop to drain, or a worker stopping: announcements change nothing."""
    feed = quiet_feed(loop)
    with loop.runtime.loop_running():
        loop.runtime.request_offload()
        queue.submit(speech_clip(1.0), GenerationParams(seed=2))
        wait_until(loop.arrivals.heard, 10, what="the announcement")
        assert not feed.due()
