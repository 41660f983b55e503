"""The Celery worker end to end: real `celery -A worker worker` processes, the private redis-server and
the real engine on the tiny model.

Most tests share one worker (module scope, 2 s idle timeout) on their own Redis database (db 1), and
each test starts from an empty job keyspace there: starting a worker costs seconds (importing torch),
and each test leaves it idle. Tests that need other settings (two workers with a short visibility
timeout, the Redis blob store) start their own workers on db 0 through the `start_worker` fixture.
The deferred and idle offload rules are also tested in process on `WorkerRuntime` with the real engine.

Redelivery after a SIGKILL (test_killed_worker_job_completes_once_on_the_other): the dead worker's
message sits in kombu's `unacked` hash. Only a live worker's `restore_visible` sweep puts it back on the
queue, once it is older than the visibility timeout. kombu runs that sweep every
`unacked_restore_interval` seconds but scans only every `unacked_restore_throttle`-th time (10 x 10 =
~100 s by default), so worker.config derives both from the visibility timeout: with
PERSONAPLEX_VISIBILITY_TIMEOUT=5 the survivor scans every second and redelivers within ~6 s. The
survivor's delivery then waits for the dead worker's job lease to expire (heartbeat TTL, 3 s here).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
import soundfile as sf
from celery import Celery
from fixtures import (
    RedisServer,
    WorkerProcess,
    collect_events,
    deliveries,
    runs,
    speech_clip,
    wait_for_job,
    wait_until,
    worker_environment,
)

from personaplex.jobs import Job, JobStatus, JobStore, Keys, WorkerRegistry
from personaplex.params import GenerationParams
from personaplex.settings import Settings
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, FsBlobStore, RedisBlobStore, read_output
from worker import create_celery_app
from worker.control import query_gpu_status, request_offload, send_job
from worker.runtime import WorkerRuntime

StartWorker = Callable[..., WorkerProcess]
SHARED_DB = 1
SHARED_IDLE_TIMEOUT_S = 2.0
"""The shared worker offloads after 2 idle seconds, so the idle offload is seen without a worker of its own."""


@dataclass
class Harness:
    """What the web does, against one worker: enqueue, read job records, send control commands."""

    app: Celery
    jobs: JobStore
    blobs: FsBlobStore
    redis: redis.Redis

    def submit(self, audio: bytes, **job_fields: object) -> Job:
        """Enqueue like the web: input blob, record, then the task with task_id = job id.

        The blob goes first: a queued record is claimable at once by a worker building a batch.
        """
        job = Job(**{"params": GenerationParams().to_dict(), **job_fields})
        self.blobs.put(job.id, INPUT, audio)
        self.jobs.create(job)
        self.send(job.id)
        return job

    def send(self, job_id: str) -> None:
        send_job(self.app, job_id)

    def gpu_status(self, worker: WorkerProcess) -> tuple[dict, float]:
        """(reply, seconds it took) of gpu_status from one worker."""
        started = time.perf_counter()
        replies = query_gpu_status(self.app, destination=[worker.hostname])
        return replies[worker.hostname], time.perf_counter() - started

    def offload(self, worker: WorkerProcess) -> tuple[dict, float]:
        started = time.perf_counter()
        replies = request_offload(self.app, destination=[worker.hostname])
        return replies[worker.hostname], time.perf_counter() - started

    def model_loaded(self, worker: WorkerProcess) -> bool:
        return self.gpu_status(worker)[0]["model_loaded"]


def make_harness(settings: Settings, client: redis.Redis) -> Iterator[Harness]:
    app = create_celery_app(settings)
    yield Harness(app, JobStore(client, settings.retention_s), FsBlobStore(settings.data_dir), client)
    app.close()


def in_phase(*phases: str) -> Callable[[Job], bool]:
    return lambda job: job.status is JobStatus.RUNNING and job.progress.get("phase") in phases


@pytest.fixture(scope="module")
def shared_settings(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    redis_server.start()
    url = redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}"
    return Settings.from_env({}, redis_url=url, data_dir=tmp_path_factory.mktemp("shared-worker"))


@pytest.fixture(scope="module")
def shared_worker(
    shared_settings: Settings, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker for the tests that leave it idle and unloaded-or-loaded; its log is printed at the end."""
    redis.Redis.from_url(shared_settings.redis_url).flushdb()
    env = worker_environment(shared_settings, tiny_checkpoint, GPU_IDLE_TIMEOUT=str(SHARED_IDLE_TIMEOUT_S))
    worker = WorkerProcess("shared", env, tmp_path_factory.mktemp("logs")).start()
    worker.wait_ready()
    yield worker
    worker.stop()
    print(f"----- log of worker {worker.hostname} -----\n{worker.log()}")


@pytest.fixture
def shared(shared_settings: Settings, shared_worker: WorkerProcess) -> Iterator[Harness]:
    """A harness on the shared worker's database, emptied of job records, blobs and events first."""
    client = redis.Redis.from_url(shared_settings.redis_url)
    keys = list(client.scan_iter(match=Keys.PREFIX + "*"))
    keys = [k for k in keys if not k.startswith(Keys.PREFIX.encode() + b"worker:")]
    if keys:
        client.delete(*keys)
    yield from make_harness(shared_settings, client)


@pytest.fixture
def harness(settings: Settings, redis_client: redis.Redis) -> Iterator[Harness]:
    """A harness on the per-test database, for workers from `start_worker`."""
    yield from make_harness(settings, redis_client)


@pytest.fixture
def events(shared: Harness) -> Iterator[list[dict]]:
    yield from collect_events(shared.redis)


# -- the runtime in process (real engine on the tiny model, no Celery) ----------------------------


@pytest.fixture
def runtime(settings: Settings, tiny_checkpoint: Path) -> WorkerRuntime:
    return WorkerRuntime(replace(settings, model=str(tiny_checkpoint), device="cpu"))


def test_runtime_status_before_the_engine_exists(runtime: WorkerRuntime) -> None:
    status = runtime.status("w@h")
    assert (status["worker"], status["model_loaded"], status["running_job"], status["device"]) == (
        "w@h",
        False,
        None,
        "cpu",
    )
    assert status["gpu"] == {
        "name": None,
        "memory_total": 0.0,
        "memory_allocated": 0.0,
        "memory_reserved": 0.0,
    }
    assert runtime.request_offload()["status"] == "not_loaded"


def test_runtime_offload_now_or_after_the_job(runtime: WorkerRuntime) -> None:
    assert runtime.ensure_loaded() > 0 and runtime.model_loaded
    assert runtime.ensure_loaded() == 0  # resident: no second load
    assert runtime.request_offload()["status"] == "offloaded" and not runtime.model_loaded

    runtime.ensure_loaded()
    with runtime.job_running("0" * 32):
        assert runtime.request_offload()["status"] == "deferred"
        assert runtime.model_loaded and not runtime.offload_if_due()
    assert not runtime.model_loaded  # the deferred offload ran when the job ended


def test_runtime_offloads_when_idle(runtime: WorkerRuntime) -> None:
    runtime.ensure_loaded()
    deadline = runtime.idle_deadline()
    assert deadline == pytest.approx(time.time() + runtime.settings.gpu_idle_timeout, abs=2)
    assert not runtime.offload_if_due(now=deadline - 1)
    assert runtime.offload_if_due(now=deadline + 1) and not runtime.model_loaded
    assert runtime.idle_deadline() is None


# -- real workers ---------------------------------------------------------------------------------


def test_job_runs_end_to_end(shared: Harness, shared_worker: WorkerProcess, events: list[dict]) -> None:
    status, _ = shared.gpu_status(shared_worker)
    assert status["running_job"] is None and status["worker"] == shared_worker.hostname

    job = shared.submit(speech_clip(3.0), input_duration_s=3.0)
    done = wait_for_job(shared.jobs, job.id)

    assert done.status is JobStatus.SUCCEEDED, done.error
    assert (done.attempts, done.worker) == (1, shared_worker.hostname)
    assert done.result["duration_s"] == pytest.approx(3.0)
    assert done.result["frames"] == 38  # 12.5 frames per second
    timings = done.result["timings"]
    assert {"queue_wait_s", "load_s", "inference_s", "rtf", "generate_s"} <= set(timings)
    assert timings["rtf"] == pytest.approx(timings["inference_s"] / 3.0, rel=1e-3)
    assert done.result["attempt"] == 1  # the attempt whose outputs the record commits
    info = sf.info(shared.blobs.path(job.id, OUTPUT_WAV, attempt=1))
    assert (info.samplerate, info.frames) == (24_000, 3 * 24_000)
    document = json.loads(read_output(shared.blobs, done, OUTPUT_JSON))
    assert document["job_id"] == job.id and document["text"] == done.result["text"]
    assert len(document["frames"]) == 38

    # The final event is published next to the record's final write: give the subscriber a moment.
    wait_until(lambda: any(e["type"] == "succeeded" for e in events), 5, what="the succeeded event")
    types = [e["type"] for e in events if e["job_id"] == job.id]
    assert types[:2] == ["queued", "started"] and types[-1] == "succeeded" and "progress" in types

    def fresh_beat() -> bool:  # one beat a second; a loaded machine may delay one past its 3 s TTL
        beats = {b["worker"]: b for b in WorkerRegistry(shared.redis).live()}
        beat = beats.get(shared_worker.hostname)
        return beat is not None and beat["timestamp"] > time.time() - 5

    wait_until(fresh_beat, 5, what="a fresh heartbeat")


def test_control_commands_answer_fast_while_a_job_runs(shared: Harness, shared_worker: WorkerProcess) -> None:
    job = shared.submit(speech_clip(300.0))  # long enough to be running still; cancelled below
    wait_for_job(shared.jobs, job.id, in_phase("prompt", "generate"))

    status, seconds = shared.gpu_status(shared_worker)
    assert seconds < 1.0
    assert status["running_job"] == job.id and status["model_loaded"] is True
    assert status["progress"]["phase"] in ("prompt", "generate") and status["idle_deadline"] is None
    assert set(status["gpu"]) == {"name", "memory_total", "memory_allocated", "memory_reserved"}
    assert status["device"] == "cpu"

    reply, seconds = shared.offload(shared_worker)
    assert seconds < 1.0
    assert reply["status"] == "deferred" and reply["worker"] == shared_worker.hostname

    shared.jobs.request_cancel(job.id)  # end the job early; the offload follows it
    assert wait_for_job(shared.jobs, job.id).status is JobStatus.CANCELLED
    wait_until(lambda: not shared.model_loaded(shared_worker), 5, what="the offload")
    assert shared.offload(shared_worker)[0]["status"] == "not_loaded"


def test_cancel_mid_job(shared: Harness, events: list[dict]) -> None:
    job = shared.submit(speech_clip(300.0))
    wait_for_job(shared.jobs, job.id, in_phase("generate"))
    assert shared.jobs.request_cancel(job.id).status is JobStatus.RUNNING

    done = wait_for_job(shared.jobs, job.id, timeout=10)
    assert done.status is JobStatus.CANCELLED and done.finished_at is not None
    assert not shared.blobs.exists(job.id, OUTPUT_WAV, attempt=1)
    # The event is published after the record changes, so it may still be on its way.
    wait_until(lambda: any(e["type"] == "cancelled" for e in events), 5, what="the cancelled event")
    assert [e["type"] for e in events if e["job_id"] == job.id][-1] == "cancelled"


def test_redelivery_of_a_finished_job_does_not_rerun_it(
    shared: Harness, shared_worker: WorkerProcess
) -> None:
    job = shared.submit(speech_clip(1.0))
    first = wait_for_job(shared.jobs, job.id)
    assert first.status is JobStatus.SUCCEEDED
    output_mtime = shared.blobs.path(job.id, OUTPUT_WAV, attempt=1).stat().st_mtime_ns

    shared.send(job.id)  # what kombu does when it restores an unacked message
    wait_until(lambda: deliveries(shared_worker, job.id, ran=False) == 1, 20, what="the redelivery")

    again = shared.jobs.get(job.id)
    assert (again.attempts, again.finished_at, again.result) == (1, first.finished_at, first.result)
    assert shared.blobs.path(job.id, OUTPUT_WAV, attempt=1).stat().st_mtime_ns == output_mtime
    assert deliveries(shared_worker, job.id, ran=True) == 1


def test_a_job_with_complete_outputs_is_finished_without_rerunning(
    shared: Harness, shared_worker: WorkerProcess
) -> None:
    source = wait_for_job(shared.jobs, shared.submit(speech_clip(1.0)).id)
    assert source.status is JobStatus.SUCCEEDED
    # As if a worker wrote the job's outputs and died before its final record: it is still running.
    job = Job(params=GenerationParams().to_dict(), input_duration_s=1.0)
    shared.blobs.put(job.id, INPUT, speech_clip(1.0))
    for name in (OUTPUT_WAV, OUTPUT_JSON):
        shared.blobs.put(job.id, name, read_output(shared.blobs, source, name), attempt=1)
    shared.jobs.create(job)
    assert shared.jobs.mark_running(job.id, "dead@elsewhere").attempts == 1
    written = shared.blobs.path(job.id, OUTPUT_WAV, attempt=1).stat().st_mtime_ns

    shared.send(job.id)  # the redelivery
    done = wait_for_job(shared.jobs, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert (done.attempts, done.worker, done.result["attempt"]) == (2, shared_worker.hostname, 1)
    document = json.loads(read_output(shared.blobs, done, OUTPUT_JSON))
    assert done.result["text"] == document["text"] and done.result["frames"] == len(document["frames"])
    assert shared.blobs.path(job.id, OUTPUT_WAV, attempt=1).stat().st_mtime_ns == written  # not written again
    assert not shared.blobs.exists(job.id, OUTPUT_WAV, attempt=2)
    wait_until(lambda: deliveries(shared_worker, job.id, ran=False) == 1, 20, what="the delivery")


def test_attempts_past_the_limit_fail_the_job(shared: Harness) -> None:
    job = shared.submit(speech_clip(1.0), attempts=3)  # as if delivered 3 times already (the default max)
    done = wait_for_job(shared.jobs, job.id)
    assert done.status is JobStatus.FAILED and done.attempts == 4
    assert "Gave up after 3 attempts" in done.error and "PERSONAPLEX_MAX_ATTEMPTS=3" in done.error
    assert not shared.blobs.exists(job.id, OUTPUT_WAV, attempt=4)


def test_engine_errors_fail_the_job_with_their_message(shared: Harness) -> None:
    not_audio = shared.submit(b"this is not a wav file")
    bad_voice = shared.submit(
        speech_clip(1.0), params={**GenerationParams().to_dict(), "voice_prompt": "NOPE.pt"}
    )

    failed = wait_for_job(shared.jobs, not_audio.id)
    assert failed.status is JobStatus.FAILED and "Could not decode the audio" in failed.error
    failed = wait_for_job(shared.jobs, bad_voice.id)
    assert failed.status is JobStatus.FAILED and "NOPE.pt" in failed.error


def test_audio_over_the_decode_budget_fails_the_job_naming_the_limit(shared: Harness) -> None:
    """384 kHz, 8 channels, 40 s of silence (a 130 KB FLAC): the worker's load refuses it from its
    header, before decoding 492 MB of float32 (issue 10, item 4)."""
    import numpy as np

    from personaplex.audio import MAX_DECODED_SAMPLES

    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 384_000, 8, "PCM_16", format="FLAC") as f:
        for _ in range(40):
            f.write(np.zeros((384_000, 8), dtype=np.int16))
    failed = wait_for_job(shared.jobs, shared.submit(buffer.getvalue()).id)
    assert failed.status is JobStatus.FAILED
    assert f"the limit is {MAX_DECODED_SAMPLES:,} samples" in failed.error


def test_idle_model_is_offloaded(shared: Harness, shared_worker: WorkerProcess) -> None:
    job = shared.submit(speech_clip(1.0))
    done = wait_for_job(shared.jobs, job.id)
    assert done.status is JobStatus.SUCCEEDED

    status, _ = shared.gpu_status(shared_worker)
    if status["model_loaded"]:  # a stalled machine may already be past the deadline
        assert status["idle_deadline"] == pytest.approx(status["last_used"] + SHARED_IDLE_TIMEOUT_S)
    wait_until(lambda: not shared.model_loaded(shared_worker), 10, what="the idle offload")
    # Not before the idle timeout (the job's end is a little after the engine's last use).
    assert time.time() >= done.finished_at + SHARED_IDLE_TIMEOUT_S - 0.5
    assert shared.gpu_status(shared_worker)[0]["idle_deadline"] is None


def test_killed_worker_job_completes_once_on_the_other(start_worker: StartWorker, harness: Harness) -> None:
    env = {"PERSONAPLEX_VISIBILITY_TIMEOUT": "5"}
    workers = {w.hostname: w for w in (start_worker("gpu0", **env), start_worker("gpu1", **env))}
    job = harness.submit(speech_clip(60.0))  # seconds of work: still running when the kill lands
    running = wait_for_job(harness.jobs, job.id, in_phase("prompt", "generate"))
    victim = workers.pop(running.worker)
    (survivor,) = workers.values()
    victim.kill()

    done = wait_for_job(harness.jobs, job.id, timeout=45)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert (done.worker, done.attempts) == (survivor.hostname, 2)
    assert sf.info(harness.blobs.path(job.id, OUTPUT_WAV, attempt=2)).frames == 60 * 24_000
    # Once: handed in by the redelivery, or claimed from its record by the survivor's idle loop
    # first (that delivery then finds it done), whichever comes first.
    wait_until(lambda: runs(survivor, job.id) > 0, 10, what="the run's log line")
    assert runs(survivor, job.id) == 1
    wait_until(
        lambda: [w["worker"] for w in WorkerRegistry(harness.redis).live()] == [survivor.hostname],
        5,
        what="the killed worker's heartbeat to expire",
    )


def test_worker_recovers_after_a_redis_restart(
    shared: Harness, shared_worker: WorkerProcess, redis_server: RedisServer
) -> None:
    redis_server.stop()  # no persistence: every key is gone, kombu's bindings included
    time.sleep(1.0)
    redis_server.start()

    def beating() -> bool:
        return shared_worker.hostname in [w["worker"] for w in WorkerRegistry(shared.redis).live()]

    wait_until(beating, 10, what="the heartbeat to come back")
    wait_until(lambda: query_gpu_status(shared.app, [shared_worker.hostname]), 20, what="control commands")
    job = shared.submit(speech_clip(1.0))
    assert wait_for_job(shared.jobs, job.id, timeout=30).status is JobStatus.SUCCEEDED


def test_redis_blob_store_serves_workers_without_a_shared_filesystem(
    start_worker: StartWorker, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    start_worker(PERSONAPLEX_BLOB_STORE="redis", PERSONAPLEX_DATA_DIR=str(tmp_path / "worker-only"))
    blobs = RedisBlobStore(redis_client, ttl_s=settings.retention_s)
    app = create_celery_app(settings)
    try:
        job = JobStore(redis_client, settings.retention_s).create(Job())
        blobs.put(job.id, INPUT, speech_clip(1.0))
        send_job(app, job.id)
        done = wait_for_job(JobStore(redis_client), job.id)
    finally:
        app.close()
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert sf.info(io.BytesIO(read_output(blobs, done, OUTPUT_WAV))).frames == 24_000
    assert json.loads(read_output(blobs, done, OUTPUT_JSON))["job_id"] == job.id
    assert not (tmp_path / "worker-only").exists()


def test_a_model_that_cannot_load_fails_the_job_with_the_reason(
    start_worker: StartWorker, harness: Harness, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    start_worker(PERSONAPLEX_MODEL=str(missing))
    job = harness.submit(speech_clip(1.0))
    done = wait_for_job(harness.jobs, job.id, timeout=60)
    assert done.status is JobStatus.FAILED
    assert str(missing) in done.error and "model.safetensors" in done.error
