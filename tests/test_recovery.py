"""The delivery guarantees under faults, with real workers, a real web process and a real Redis.

- A worker paused past its lease (SIGSTOP) loses its jobs to another attempt and, resumed, writes
  nothing: not its outputs, not its final record (alone and batched).
- A SIGKILLed worker's job runs again on another worker within about one heartbeat TTL, with the
  default 6-hour visibility timeout, exactly once; meanwhile its record says it is queued again.
- A web process killed between writing a batch's records and sending their messages strands no
  job: a worker sends the missing messages, and every job runs once.
- A Redis restart that loses a running job's record stops that job cleanly.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import requests
from fixtures import (
    Queue,
    RedisServer,
    WorkerProcess,
    free_port,
    runs,
    speech_clip,
    wait_for_job,
    wait_until,
)

from personaplex.devstack import web_process
from personaplex.jobs import Job, JobStatus, Keys
from personaplex.params import GenerationParams
from personaplex.storage import OUTPUT_JSON, OUTPUT_WAV, read_output

StartWorker = Callable[..., WorkerProcess]


def generating(job: Job) -> bool:
    return job.status is JobStatus.RUNNING and job.progress.get("phase") == "generate"


@contextmanager
def paused(worker: WorkerProcess) -> Iterator[None]:
    """SIGSTOP the worker's process (a long GC, a frozen VM, a partition), SIGCONT it afterwards."""
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        worker.process.send_signal(signal.SIGCONT)


def lost_deliveries(worker: WorkerProcess, job_id: str) -> int:
    """Deliveries of the job the worker ended as lost (it found its lease taken)."""
    return sum(
        1 for line in worker.log().splitlines() if f"[{job_id}]" in line and "'status': 'lost'" in line
    )


def assert_committed_by(queue: Queue, job_id: str, worker: WorkerProcess, attempt: int) -> Job:
    """The record names `attempt` on `worker`, and the outputs it serves are that attempt's."""
    job = queue.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED, job
    assert (job.worker, job.attempts, job.result["attempt"]) == (worker.hostname, attempt, attempt)
    document = json.loads(read_output(queue.blobs, job, OUTPUT_JSON))
    assert document["text"] == job.result["text"] and len(document["frames"]) == job.result["frames"]
    return job


def test_a_paused_worker_writes_nothing_once_another_attempt_took_its_job(
    start_worker: StartWorker, queue: Queue
) -> None:
    first = start_worker("gpu0")
    # Long enough to outlast the second worker's start (seconds on a loaded machine).
    job = queue.submit(speech_clip(300.0), GenerationParams(seed=5))
    wait_for_job(queue.jobs, job.id, generating)
    second = start_worker("gpu1")  # started after: the job's message went to the first

    with paused(first):
        done = wait_for_job(queue.jobs, job.id, timeout=120)  # queued again, then run by the second
    assert_committed_by(queue, job.id, second, attempt=2)

    wait_until(lambda: lost_deliveries(first, job.id) == 1, 30, what="the first worker to give the job up")
    assert f"job {job.id}: attempt 1 lost its lease" in first.log()
    after = assert_committed_by(queue, job.id, second, attempt=2)
    assert (after.finished_at, after.result) == (done.finished_at, done.result)  # not rewritten
    assert not queue.blobs.exists(job.id, OUTPUT_WAV, attempt=1)  # the stale attempt left nothing
    assert runs(second, job.id) == 1


def test_a_paused_batch_writes_nothing_once_its_jobs_ran_elsewhere(
    start_worker: StartWorker, queue: Queue
) -> None:
    jobs = [queue.submit(speech_clip(240.0), GenerationParams(seed=s)) for s in (1, 2)]
    first = start_worker("gpu0")  # takes the first message and claims the other job into its batch
    wait_until(
        lambda: all(
            generating(j) and j.worker == first.hostname for j in queue.jobs.get_many(j.id for j in jobs)
        ),
        60,
        what="both jobs generating in the first worker's batch",
    )
    second = start_worker("gpu1")  # receives the claimed job's own message: it comes back later

    with paused(first):
        for job in jobs:
            wait_for_job(queue.jobs, job.id, timeout=120)
    for job in jobs:
        assert_committed_by(queue, job.id, second, attempt=2)

    wait_until(
        lambda: all(f"job {j.id}: attempt 1 lost its lease" in first.log() for j in jobs),
        30,
        what="the first worker to give both jobs up",
    )
    wait_until(lambda: lost_deliveries(first, jobs[0].id) == 1, 30, what="its delivery to end")
    for job in jobs:
        assert_committed_by(queue, job.id, second, attempt=2)
        assert not queue.blobs.exists(job.id, OUTPUT_WAV, attempt=1)
        assert runs(second, job.id) == 1


def test_a_killed_workers_job_runs_again_within_the_lease_not_the_visibility_timeout(
    start_worker: StartWorker, queue: Queue
) -> None:
    ttl = 15.0  # the defaults: heartbeat (and lease) TTL 15 s, visibility timeout 6 h
    defaults = {"PERSONAPLEX_HEARTBEAT_TTL": str(ttl)}
    workers = {w.hostname: w for w in (start_worker("gpu0", **defaults), start_worker("gpu1", **defaults))}
    job = queue.submit(speech_clip(120.0), GenerationParams(seed=9))
    running = wait_for_job(queue.jobs, job.id, generating, timeout=60)
    victim = workers.pop(running.worker)
    (survivor,) = workers.values()
    victim.kill()
    killed_at = time.monotonic()

    seen: list[tuple[float, Job]] = []
    done = wait_for_job(
        queue.jobs, job.id, lambda j: bool(seen.append((time.monotonic(), j))) or j.status.is_final
    )
    assert time.monotonic() - killed_at < 60
    assert_committed_by(queue, job.id, survivor, attempt=2)
    assert runs(survivor, job.id) == 1

    # Never a frozen "running" on the dead worker past two TTLs: queued again, with a note, then run.
    frozen = [j for t, j in seen if t - killed_at > 2 * ttl and j.worker == victim.hostname]
    assert not frozen, frozen[-1]
    # Queued again for a moment only (the survivor was idle); the record's note says why.
    assert victim.hostname in done.note and "queued again for attempt 2" in done.note


def _batch_files(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    clip = speech_clip(0.3)
    return [("files", (f"clip{i:03d}.wav", clip, "audio/wav")) for i in range(count)]


def _kill_web_between_records_and_messages(
    redis_client: redis.Redis, env: dict[str, str], logdir: Path, count: int
) -> tuple[list[str], int]:
    """POST a batch to a real web process and SIGKILL it as soon as every record is written; returns
    the job ids and how many had no message sent yet."""
    port = free_port()
    web = web_process(port, {**env, "PORT": str(port)}, logdir).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base), 30, what="the web server")
    before = redis_client.zcard(Keys.INDEX)
    upload = threading.Thread(target=_post_quietly, args=(f"{base}/api/batches", _batch_files(count)))
    upload.start()
    try:
        wait_until(
            lambda: redis_client.zcard(Keys.INDEX) >= before + count, 60, what="the records", interval=0.001
        )
        web.kill()
    finally:
        web.kill()
        upload.join(timeout=30)
    ids = [i.decode() for i in redis_client.zrange(Keys.INDEX, before, -1)]
    return ids, redis_client.zcard(Keys.OUTBOX)


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


def _post_quietly(url: str, files: list) -> None:
    with contextlib.suppress(requests.RequestException):  # the server is killed mid-request
        requests.post(url, files=files, timeout=60)


def test_a_web_killed_between_records_and_messages_strands_no_job(
    start_worker: StartWorker,
    worker_env: dict[str, str],
    redis_client: redis.Redis,
    tmp_path: Path,
    queue: Queue,
) -> None:
    env = dict(worker_env)
    for _ in range(5):  # the kill must land inside the window; it nearly always does the first time
        ids, unsent = _kill_web_between_records_and_messages(redis_client, env, tmp_path / "logs", 200)
        if unsent:
            break
        for job_id in ids:
            queue.jobs.request_cancel(job_id)
    assert unsent > 0, "the web was never killed between its records and its messages"
    assert len(ids) == 200

    worker = start_worker("gpu0", PERSONAPLEX_DISPATCH_GRACE_S="1")
    for job_id in ids:
        done = wait_for_job(queue.jobs, job_id, timeout=300)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 1, done
    wait_until(lambda: all(runs(worker, i) for i in ids), 30, what="every run's log line")
    assert [runs(worker, i) for i in ids] == [1] * len(ids)
    assert redis_client.zcard(Keys.OUTBOX) == 0 and queue.jobs.queue_length() == 0


def test_a_redis_restart_that_loses_a_running_job_stops_it_cleanly(
    start_worker: StartWorker, queue: Queue, redis_server: RedisServer
) -> None:
    worker = start_worker("gpu0")
    job = queue.submit(speech_clip(120.0), GenerationParams(seed=3))
    wait_for_job(queue.jobs, job.id, generating)
    redis_server.stop()  # no persistence: the record and the lease are gone with it
    time.sleep(1.0)
    redis_server.start()

    worker.wait_for_log(f"job {job.id}: attempt 1 lost its lease", 30)
    wait_until(lambda: lost_deliveries(worker, job.id) == 1, 60, what="the delivery to end")
    assert not queue.blobs.exists(job.id, OUTPUT_WAV, attempt=1)
    again = queue.submit(speech_clip(1.0), GenerationParams(seed=4))  # and the worker serves on
    assert wait_for_job(queue.jobs, again.id, timeout=60).status is JobStatus.SUCCEEDED
