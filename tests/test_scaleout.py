"""Scale-out: two GPU workers (`gpu0@test`, `gpu1@test`) on one Redis, behind the real web server.

Real `celery -A worker worker` subprocesses on the tiny model and the private redis-server; every
request goes through HTTP. One test, in stages, so the two workers start once (each costs seconds):

1. a handful of jobs runs on both workers;
2. /api/gpu/status lists both, each answering live;
3. /api/gpu/offload?worker=gpu0@test reaches gpu0 only: gpu1 keeps its model;
4. gpu0 is stopped (warm shutdown, SIGTERM, as `docker stop` does) while it runs a job and others
   wait in the queue: its running job finishes on it, and every queued one finishes on gpu1, each in
   one delivery (acks_late: an unstarted message goes back to the queue, never into the void).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fixtures import WorkerProcess, speech_clip, stop_all, wait_until

from personaplex.client import PersonaPlexClient
from personaplex.settings import Settings
from web import create_app
from web.server_thread import ServerThread

NAMES = ("gpu0", "gpu1")
CELERY_QUEUE = "celery"
"""The broker list in Redis that holds messages no worker has taken yet."""


@pytest.fixture
def fleet(worker_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Both workers, started side by side (imports overlap), by hostname; logs printed afterwards."""
    # One job per delivery: batching would let one worker claim every queued job, and this test is
    # about how separate workers share the queue (tests/test_batching.py covers batches).
    env = {**worker_env, "PERSONAPLEX_MAX_BATCH": "1"}
    workers = [WorkerProcess(name, env, tmp_path / "logs").start() for name in NAMES]
    try:
        for worker in workers:
            worker.wait_ready()
        yield {worker.hostname: worker for worker in workers}
    finally:
        stop_all(workers)
        for worker in workers:
            print(f"----- log of worker {worker.hostname} -----\n{worker.log()}")


@pytest.fixture
def client(settings: Settings) -> Iterator[PersonaPlexClient]:
    app = create_app({"redis_url": settings.redis_url, "data_dir": settings.data_dir}, environ={})
    with ServerThread(app) as server:
        yield PersonaPlexClient(server.url)


def submit(client: PersonaPlexClient, count: int, seconds: float = 1.0) -> list[str]:
    clip = speech_clip(seconds)
    return [client.submit_job(clip, filename=f"clip{i}.wav")["job_id"] for i in range(count)]


def finish(client: PersonaPlexClient, job_ids: list[str], timeout: float = 120.0) -> list[dict[str, Any]]:
    jobs = [client.wait(job_id, timeout=timeout, poll_interval=0.2) for job_id in job_ids]
    for job in jobs:
        assert job["status"] == "succeeded", job
    return jobs


def live_workers(client: PersonaPlexClient) -> dict[str, dict[str, Any]]:
    return {w["worker"]: w for w in client.gpu_status()["workers"]}


@pytest.mark.slow
def test_two_workers_share_the_queue_answer_control_and_lose_nothing_on_a_warm_stop(
    fleet: dict[str, WorkerProcess], client: PersonaPlexClient, redis_client: redis.Redis
) -> None:
    gpu0, gpu1 = (f"{name}@test" for name in NAMES)

    # 1. Jobs run on both: each idle worker takes one message at a time (prefetch 1, acks_late).
    jobs = finish(client, submit(client, 4))
    assert {job["worker"] for job in jobs} == {gpu0, gpu1}
    assert all(job["attempts"] == 1 for job in jobs)

    # 2. The fleet: both listed, each from a live control reply, both with the model loaded.
    status = client.gpu_status()
    assert status["worker_count"] == 2
    assert {name: (w["source"], w["model_loaded"]) for name, w in live_workers(client).items()} == {
        gpu0: ("live", True),
        gpu1: ("live", True),
    }

    # 3. Offload one worker by name: only it answers, only it frees its model.
    offload = client.offload(worker=gpu0)
    assert [reply["worker"] for reply in offload["workers"]] == [gpu0]
    assert offload["status"] == "offloaded"
    fleet_now = live_workers(client)
    assert (fleet_now[gpu0]["model_loaded"], fleet_now[gpu1]["model_loaded"]) == (False, True)

    # 4. Warm stop of gpu0 mid-job, with jobs still waiting in the broker queue.
    queued = submit(client, 5, seconds=30.0)  # over a second each: some are still queued at the stop

    def gpu0_busy() -> str | None:
        running = [client.get_job(i) for i in queued]
        return next((j["id"] for j in running if j["status"] == "running" and j["worker"] == gpu0), None)

    running_on_gpu0 = wait_until(gpu0_busy, 60, interval=0.05, what="gpu0 to start one of the jobs")
    assert redis_client.llen(CELERY_QUEUE) >= 1, "the stop must happen with messages still queued"
    stopped_at = time.time()
    fleet[gpu0].terminate()
    assert fleet[gpu0].process is not None
    assert fleet[gpu0].process.wait(timeout=60) == 0, fleet[gpu0].log()[-4000:]

    jobs = {job["id"]: job for job in finish(client, queued)}
    assert jobs[running_on_gpu0]["worker"] == gpu0  # the warm shutdown let it finish
    assert all(job["attempts"] == 1 for job in jobs.values()), jobs  # none redelivered, none lost
    after_stop = [job["worker"] for job in jobs.values() if job["started_at"] > stopped_at]
    assert after_stop and set(after_stop) == {gpu1}, jobs
    # gpu1's running batch claimed some jobs straight from the job store; their messages come to it
    # afterwards and are acked without a run (the job is final), so the queue drains.
    wait_until(lambda: redis_client.llen(CELERY_QUEUE) == 0, 30, what="the leftover messages to drain")

    # The stopped worker removed its heartbeat: the fleet is gpu1 alone.
    wait_until(lambda: list(live_workers(client)) == [gpu1], 5, what="gpu0 to leave the fleet")
