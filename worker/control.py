"""How other processes drive the GPU workers: the task they run and the control commands they answer.

The web (and tests, tools) import only this: no torch, no engine, no runner, so enqueueing and
asking for status load none of the worker's machinery. The commands themselves are answered in
worker.commands, from the process that holds the model; the replies are typed in personaplex.fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from personaplex.fleet import OffloadReply, WorkerRecord

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

TASK_NAME = "personaplex.process_audio"
"""The one task; it is sent by name with task_id = job id, its only argument the job id."""

GPU_STATUS = "gpu_status"
"""The inspect command whose reply is a worker's WorkerRecord (without a timestamp)."""

OFFLOAD = "offload"
"""The control command that frees a worker's model now, or when its job ends; replies OffloadReply."""

REPLY_TIMEOUT_S = 1.0
"""How long callers wait for replies; workers answer in milliseconds even while a job runs."""


def send_job(app: Celery, job_id: str, **options: Any) -> AsyncResult:
    """Publish job `job_id`'s message (`options`: Celery's publish options, e.g. retry_policy)."""
    return app.send_task(TASK_NAME, args=[job_id], task_id=job_id, **options)


def query_gpu_status(
    app: Celery,
    destination: list[str] | None = None,
    timeout: float = REPLY_TIMEOUT_S,
    expected: int | None = None,
) -> dict[str, WorkerRecord]:
    """gpu_status of every live worker (or those named), keyed by worker name.

    `expected`: how many workers are believed alive; the wait ends once that many have answered.
    """
    return cast(dict[str, WorkerRecord], _broadcast(app, GPU_STATUS, destination, timeout, expected))


def request_offload(
    app: Celery,
    destination: list[str] | None = None,
    timeout: float = REPLY_TIMEOUT_S,
    expected: int | None = None,
) -> dict[str, OffloadReply]:
    """Ask every live worker (or those named) to offload; replies keyed by worker name."""
    return cast(dict[str, OffloadReply], _broadcast(app, OFFLOAD, destination, timeout, expected))


def _broadcast(
    app: Celery, command: str, destination: list[str] | None, timeout: float, expected: int | None
) -> dict[str, dict[str, Any]]:
    """Send once more if the first try fails on a connection: after a Redis restart the first use
    of a pooled broker connection raises ConnectionError, and the retry gets a fresh one."""
    # Stop waiting once everyone expected has answered instead of always waiting `timeout`.
    limit = len(destination) if destination else (expected or None)
    try:
        return _broadcast_once(app, command, destination, timeout, limit)
    except app.connection_for_write().connection_errors:
        return _broadcast_once(app, command, destination, timeout, limit)


def _broadcast_once(
    app: Celery, command: str, destination: list[str] | None, timeout: float, limit: int | None
) -> dict[str, dict[str, Any]]:
    replies = app.control.broadcast(
        command, reply=True, timeout=timeout, destination=destination, limit=limit
    )
    replies = replies or []
    return {name: reply for item in replies for name, reply in item.items()}
