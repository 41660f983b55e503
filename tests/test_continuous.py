"""Continuous batching in the worker: jobs join the running loop's free rows and leave it as they end.

Real `celery` workers on the tiny model (CPU, fp32) and a private redis-server. A job that joins a
running loop gets exactly what it gets alone (tokens and WAV bytes); a short job does not wait for
a long one; jobs arriving over time are each run once, oldest first; a worker killed mid-loop has
every job finished once elsewhere; a joined row can be cancelled; an offload asked mid-loop waits
for the loop to drain, and the loop takes no more jobs meanwhile; an idle queue costs one Redis
round trip per look.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import redis
from fixtures import (
    Queue,
    WorkerProcess,
    runs,
    speech_clip,
    wait_for_job,
    wait_until,
)

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest
from personaplex.engine.core import Engine
from personaplex.jobs import Job, JobStatus
from personaplex.params import GenerationParams
from personaplex.storage import OUTPUT_WAV, read_output
from worker.control import query_gpu_status, request_offload
from worker.housekeeping import RECOVER_EVERY_S
from worker.loop import REFILL_CHECK_INTERVAL_S

StartWorker = Callable[..., WorkerProcess]


def generating_on(queue: Queue, job: Job, worker: WorkerProcess) -> Callable[[], bool]:
    """Whether the job runs on the worker and has reached its generate phase."""

    def check() -> bool:
        record = queue.jobs.get(job.id)
        return (
            record is not None
            and record.status is JobStatus.RUNNING
            and record.worker == worker.hostname
            and record.progress.get("phase") == "generate"
        )

    return check


def running_on(queue: Queue, job: Job, worker: WorkerProcess) -> Callable[[], bool]:
    def check() -> bool:
        record = queue.jobs.get(job.id)
        return record is not None and record.status is JobStatus.RUNNING and record.worker == worker.hostname

    return check


def assert_equals_alone(
    queue: Queue, engine: Engine, job: Job, audio: bytes, params: GenerationParams
) -> None:
    """The job's tokens and WAV bytes are what the same engine gives it alone (a batch of one)."""
    record = queue.jobs.get(job.id)
    assert record is not None and record.status is JobStatus.SUCCEEDED, record and record.error
    [alone] = engine.process_batch([BatchRequest(audio, params)])
    assert not isinstance(alone, Exception), alone
    assert queue.tokens(job.id) == alone.tokens
    assert read_output(queue.blobs, record, OUTPUT_WAV) == audio_io.encode_wav(alone.audio, alone.sample_rate)


def test_a_short_job_submitted_while_a_long_one_runs_finishes_first(
    start_worker: StartWorker, queue: Queue, tiny_engine: Engine
) -> None:
    worker = start_worker("gpu0")
    long = queue.submit(speech_clip(120.0), GenerationParams(seed=1))
    wait_until(generating_on(queue, long, worker), 60, what="the long job's generate phase")
    audio, params = speech_clip(3.0), GenerationParams(seed=2, voice_prompt="VARM1.pt")
    short = queue.submit(audio, params)
    done = wait_for_job(queue.jobs, short.id, timeout=60)
    assert queue.jobs.get(long.id).status is JobStatus.RUNNING, "the short job waited for the long one"
    assert (done.worker, done.attempts) == (worker.hostname, 1)
    assert done.result["engine_batch"]["leader"] == long.id  # it joined the long job's loop
    assert_equals_alone(queue, tiny_engine, short, audio, params)
    final = wait_for_job(queue.jobs, long.id, timeout=120)
    assert final.status is JobStatus.SUCCEEDED and final.attempts == 1, final.error


def test_a_short_job_passes_one_that_waits_for_a_bigger_loop(
    start_worker: StartWorker, queue: Queue, tiny_engine: Engine
) -> None:
    """The 90 s job does not fit the loop sized for the 60 s one, so it waits for the next loop; the
    1 s job queued after it ends long before that loop drains, so it joins at once (backfilling)."""
    worker = start_worker("gpu0")
    running = queue.submit(speech_clip(60.0), GenerationParams(seed=3))
    wait_until(generating_on(queue, running, worker), 60, what="the 60 s job's generate phase")
    held = queue.submit(speech_clip(90.0), GenerationParams(seed=4))
    wait_until(running_on(queue, held, worker), 10, what="the 90 s job claimed by the running batch")
    audio, params = speech_clip(1.0), GenerationParams(seed=5)
    short = queue.submit(audio, params)
    done = wait_for_job(queue.jobs, short.id, timeout=60)
    assert queue.jobs.get(running.id).status is JobStatus.RUNNING, (
        "the short job waited for the loop to drain"
    )
    assert done.result["engine_batch"]["leader"] == running.id
    assert_equals_alone(queue, tiny_engine, short, audio, params)
    first, second = (wait_for_job(queue.jobs, job.id, timeout=120) for job in (running, held))
    assert first.status is second.status is JobStatus.SUCCEEDED, (first.error, second.error)
    assert second.finished_at > first.finished_at


def test_jobs_arriving_over_time_each_run_once_and_equal_their_solo_result(
    start_worker: StartWorker, queue: Queue, tiny_engine: Engine
) -> None:
    chance = random.Random(12)
    inputs = [
        (speech_clip(chance.uniform(0.5, 6.0)), GenerationParams(seed=10 + i, greedy=i % 4 == 0))
        for i in range(10)
    ]
    worker = start_worker("gpu0", PERSONAPLEX_MAX_BATCH="4")
    jobs = []
    for audio, params in inputs:
        jobs.append(queue.submit(audio, params))
        time.sleep(chance.uniform(0.0, 1.0))
    done = [wait_for_job(queue.jobs, job.id, timeout=120) for job in jobs]
    for job, record, (audio, params) in zip(jobs, done, inputs, strict=True):
        assert (record.status, record.attempts) == (JobStatus.SUCCEEDED, 1), record.error
        wait_until(lambda job=job: runs(worker, job.id) > 0, 10, what="the run's log line")
        assert runs(worker, job.id) == 1
        assert_equals_alone(queue, tiny_engine, job, audio, params)
    # Oldest first: the jobs started in the order they were submitted.
    started = [record.started_at for record in done]
    assert started == sorted(started)
    # Some arrived while a loop ran and joined it (a loop drains between arrivals that come late).
    assert "joins the running loop" in worker.log(), "no job joined a running loop"


def test_a_worker_killed_mid_loop_has_every_job_finished_once_elsewhere(
    start_worker: StartWorker, queue: Queue
) -> None:
    env = {"PERSONAPLEX_VISIBILITY_TIMEOUT": "5"}
    spare = start_worker("gpu1", queues="idle", **env)
    victim = start_worker("gpu0", **env)
    first = queue.submit(speech_clip(60.0), GenerationParams(seed=1))
    wait_until(generating_on(queue, first, victim), 60, what="the first job's generate phase")
    joined = [queue.submit(speech_clip(40.0), GenerationParams(seed=s)) for s in (2, 3)]
    for job in joined:
        wait_until(running_on(queue, job, victim), 30, what="a job joining the loop")
    victim.kill()
    queue.app.control.add_consumer("celery", destination=[spare.hostname], reply=True)
    for job in [first, *joined]:
        done = wait_for_job(queue.jobs, job.id, timeout=120)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert (done.worker, done.attempts) == (spare.hostname, 2)
        wait_until(lambda job=job: runs(spare, job.id) > 0, 10, what="the run's log line")
        assert runs(spare, job.id) == 1


def test_a_row_cancelled_mid_loop_leaves_and_the_loop_goes_on(
    start_worker: StartWorker, queue: Queue
) -> None:
    worker = start_worker("gpu0")
    long = queue.submit(speech_clip(60.0), GenerationParams(seed=1))
    wait_until(generating_on(queue, long, worker), 60, what="the long job's generate phase")
    joined = queue.submit(speech_clip(40.0), GenerationParams(seed=2))
    wait_until(generating_on(queue, joined, worker), 30, what="the joined job's generate phase")
    asked = time.monotonic()
    queue.jobs.request_cancel(joined.id)
    cancelled = wait_for_job(queue.jobs, joined.id, timeout=10)
    assert cancelled.status is JobStatus.CANCELLED and time.monotonic() - asked < 3.0
    assert queue.jobs.get(long.id).status is JobStatus.RUNNING
    after = queue.submit(speech_clip(1.0), GenerationParams(seed=3))  # takes the freed row
    assert wait_for_job(queue.jobs, after.id, timeout=30).status is JobStatus.SUCCEEDED
    assert queue.jobs.get(long.id).status is JobStatus.RUNNING
    assert wait_for_job(queue.jobs, long.id, timeout=90).status is JobStatus.SUCCEEDED


def test_an_offload_asked_mid_loop_waits_for_it_to_drain(start_worker: StartWorker, queue: Queue) -> None:
    worker = start_worker("gpu0")
    long = queue.submit(speech_clip(120.0), GenerationParams(seed=1))
    wait_until(generating_on(queue, long, worker), 60, what="the long job's generate phase")
    replies = request_offload(queue.app, [worker.hostname], timeout=5.0)
    assert replies[worker.hostname]["status"] == "deferred"
    waiting = queue.submit(speech_clip(1.0), GenerationParams(seed=2))
    time.sleep(4 * REFILL_CHECK_INTERVAL_S)
    assert queue.jobs.get(waiting.id).status is JobStatus.QUEUED, "the loop took a job while draining"
    status = query_gpu_status(queue.app, [worker.hostname], timeout=5.0)[worker.hostname]
    assert status["running_jobs"] == [long.id]  # control commands answer while the loop runs
    finished = wait_for_job(queue.jobs, long.id, timeout=90)
    later = wait_for_job(queue.jobs, waiting.id, timeout=60)
    assert finished.status is later.status is JobStatus.SUCCEEDED
    assert later.started_at >= finished.finished_at  # after the drain, the offload and a reload
    assert later.result["timings"]["load_s"] > 0, "the model was not offloaded in between"


def test_an_idle_queue_costs_one_round_trip_per_look(
    start_worker: StartWorker, queue: Queue, redis_client: redis.Redis
) -> None:
    worker = start_worker("gpu0", PERSONAPLEX_MAX_BATCH="2")  # a free row: the loop keeps looking
    job = queue.submit(speech_clip(20.0), GenerationParams(seed=1))
    wait_until(generating_on(queue, job, worker), 60, what="the generate phase")
    before, clock = _zrange_calls(redis_client), time.monotonic()
    record = wait_for_job(queue.jobs, job.id, timeout=60)
    calls, seconds = _zrange_calls(redis_client) - before, time.monotonic() - clock
    assert record.status is JobStatus.SUCCEEDED
    looks = seconds / REFILL_CHECK_INTERVAL_S + seconds / RECOVER_EVERY_S + 3  # the loop's, housekeeping's
    assert 1 <= calls <= looks and calls < record.result["frames"], (calls, seconds)


def _zrange_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_zrange", {}).get("calls", 0))
