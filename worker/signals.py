"""Worker lifecycle hooks: start housekeeping when the worker is ready, drain the running loop when
shutting down begins, stop housekeeping at shutdown.

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


@worker_shutting_down.connect
def stop_admitting(**kwargs: Any) -> None:
    """A warm shutdown waits for the running task: its loop must not take more jobs meanwhile."""
    get_runtime().drain()


@worker_shutdown.connect
def stop_housekeeping(sender: Any = None, **kwargs: Any) -> None:
    while _housekeepers:
        _housekeepers.pop().stop()
