"""Worker lifecycle hooks: start housekeeping and the engine loop when the worker is ready (the loop
takes live conversations before any job arrives), drain the loop when shutting down begins, and at
shutdown wait for its jobs to finish, then stop housekeeping (which renews their leases meanwhile).

`worker_process_init` does not fire under the threads pool (docs/architecture.md §1), so `worker_ready` it is.
The engine is not loaded here: the first job loads it (lazily, under a lock) and it then stays.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from worker.control import send_job
from worker.housekeeping import Housekeeper
from worker.runtime import get_runtime

_housekeepers: list[Housekeeper] = []


@worker_ready.connect
def start_housekeeping(sender: Any, **kwargs: Any) -> None:
    app = sender.app
    housekeeper = Housekeeper(get_runtime(), sender.hostname, lambda job_id: send_job(app, job_id))
    housekeeper.start()
    _housekeepers.append(housekeeper)
    get_runtime().loop(sender.hostname)


@worker_shutting_down.connect
def stop_admitting(**kwargs: Any) -> None:
    """A warm shutdown waits for the running task: its loop must not take more jobs meanwhile."""
    get_runtime().drain()


@worker_shutdown.connect
def stop_housekeeping(sender: Any = None, **kwargs: Any) -> None:
    get_runtime().stop_loop()
    while _housekeepers:
        _housekeepers.pop().stop()
