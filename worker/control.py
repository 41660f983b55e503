"""Remote control commands, answered by each worker from the process that holds the model.

They run on the worker's event-loop thread, so they only read state and never wait on the engine:
`offload` while a job runs replies "deferred" and the model is freed when the job ends.

Callers (the web) use the helpers at the bottom, which return {worker name: reply}.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.worker.control import control_command, inspect_command

from worker.runtime import get_runtime

REPLY_TIMEOUT_S = 1.0
"""How long callers wait for replies; workers answer in milliseconds even while a job runs."""


def _hostname(state: Any) -> str:
    return state.consumer.hostname


@inspect_command()
def gpu_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Model, GPU memory, running job and its progress, and idle deadline of this worker."""
    return get_runtime().status(_hostname(state))


@control_command()
def offload(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Free the model's GPU memory now, or when the running job ends ("deferred")."""
    return {**get_runtime().request_offload(), "worker": _hostname(state)}


def query_gpu_status(
    app: Celery,
    destination: list[str] | None = None,
    timeout: float = REPLY_TIMEOUT_S,
    expected: int | None = None,
) -> dict[str, dict[str, Any]]:
    """gpu_status of every live worker (or those named), keyed by worker name.

    `expected`: how many workers are believed alive; the wait ends once that many have answered.
    """
    return _broadcast(app, "gpu_status", destination, timeout, expected)


def request_offload(
    app: Celery,
    destination: list[str] | None = None,
    timeout: float = REPLY_TIMEOUT_S,
    expected: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Ask every live worker (or those named) to offload; replies keyed by worker name."""
    return _broadcast(app, "offload", destination, timeout, expected)


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
