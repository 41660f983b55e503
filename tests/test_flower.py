"""Flower on our Celery config: `celery -A worker flower`, basic auth from the environment.

A real Flower subprocess on a free loopback port against the private Redis, a real worker on the
tiny model and the real web server: a job submitted over HTTP shows up in Flower's API as a
finished `personaplex.process_audio` task, next to the worker that ran it. Flower builds its task
list from Celery events, so this also proves the config turns task events on (docs/architecture.md §1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fixtures import REPO_ROOT, WorkerProcess, free_port, speech_clip, wait_until

from personaplex.client import PersonaPlexClient
from personaplex.devstack import CELERY, ServiceProcess
from personaplex.settings import Settings
from web import create_app
from web.server_thread import ServerThread
from worker import TASK_NAME

USER, PASSWORD = "ops", "s3cret-pass"


class Flower:
    """A `celery -A worker flower` subprocess configured only through the environment, like compose."""

    def __init__(self, redis_url: str, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        env = {
            **inherited,
            "PYTHONPATH": str(REPO_ROOT),
            "REDIS_URL": redis_url,
            "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
            "FLOWER_PORT": str(self.port),
            "FLOWER_ADDRESS": "127.0.0.1",
        }
        self.process = ServiceProcess("flower", [CELERY, "-A", "worker", "flower"], env, logdir)

    def start(self) -> Flower:
        self.process.start()
        return self

    def get(
        self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), **params: Any
    ) -> requests.Response:
        return requests.get(self.url + path, auth=auth, params=params, timeout=10)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            if self.process.process is not None and self.process.process.poll() is not None:
                raise RuntimeError(f"flower exited early:\n{self.process.log()[-4000:]}")
            try:
                return self.get("/healthcheck", auth=None).text == "OK"
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, interval=0.2, what="flower to answer")


@pytest.fixture
def flower(settings: Settings, tmp_path: Path) -> Iterator[Flower]:
    flower = Flower(settings.redis_url, tmp_path / "logs").start()
    yield flower
    flower.process.stop(timeout=10)
    print(f"----- log of flower -----\n{flower.process.log()}")


@pytest.mark.slow
def test_flower_lists_the_worker_and_the_finished_task(
    flower: Flower, start_worker: Callable[..., WorkerProcess], settings: Settings
) -> None:
    worker = start_worker("gpu0")
    flower.wait_ready()

    # Without credentials, or with wrong ones, the API refuses; the UI too.
    assert flower.get("/api/workers", auth=None).status_code == 401
    assert flower.get("/api/workers", auth=(USER, "wrong")).status_code == 401
    assert flower.get("/api/tasks", auth=None).status_code == 401
    assert flower.get("/workers", auth=None).status_code == 401

    # The worker, through an inspect broadcast, with its queue and our task registered. Flower asks
    # each inspect method with a 1 s timeout; on a loaded machine one may miss it: refresh again.
    def inspected() -> dict[str, Any] | None:
        response = flower.get("/api/workers", refresh="1")
        info = response.json().get(worker.hostname) if response.status_code == 200 else None
        return info if info and {"registered", "active_queues", "stats"} <= set(info) else None

    info = wait_until(inspected, 20, interval=0.5, what="flower to list the worker")
    assert TASK_NAME in info["registered"]
    assert [q["name"] for q in info["active_queues"]] == ["celery"]
    assert info["stats"]["pool"]["max-concurrency"] == 1

    # Flower's event receiver has heard from the worker: task events sent from now on reach it.
    wait_until(
        lambda: flower.get("/api/workers", status="1").json().get(worker.hostname) is True,
        20,
        interval=0.5,
        what="flower to receive the worker's events",
    )

    app = create_app({"redis_url": settings.redis_url, "data_dir": settings.data_dir}, environ={})
    with ServerThread(app) as server:
        client = PersonaPlexClient(server.url)
        job_id = client.submit_job(speech_clip(1.0), filename="hello.wav")["job_id"]
        job = client.wait(job_id, timeout=60)
    assert job["status"] == "succeeded", job

    def finished() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks", taskname=TASK_NAME).json()
        task = tasks.get(job_id)
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_until(finished, 15, interval=0.3, what="flower to see the task succeed")
    assert task["name"] == TASK_NAME and task["worker"] == worker.hostname
    assert task["args"] == repr([job_id])  # only the job id travels in the message, never audio
    assert "'succeeded'" in task["result"]

    info = flower.get(f"/api/task/info/{job_id}").json()
    assert info["state"] == "SUCCESS" and info["sent"] is not None  # task_send_sent_event
    assert flower.get("/api/task/types").json()["task-types"] == [TASK_NAME]
    assert flower.get("/api/queues/length").json()["active_queues"] == [{"name": "celery", "messages": 0}]
