"""Remote control commands, answered by each worker from the process that holds the model.

They run on the worker's event-loop thread, so they only read state and never wait on the engine:
`offload` while a job runs replies "deferred" and the model is freed when the job ends. Callers use
the helpers in worker.control, which name these commands and return {worker name: reply}.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from personaplex.fleet import OffloadReply, WorkerRecord
from worker.control import GPU_STATUS, OFFLOAD
from worker.runtime import get_runtime


def _hostname(state: Any) -> str:
    return state.consumer.hostname


@inspect_command(name=GPU_STATUS)
def gpu_status(state: Any, **kwargs: Any) -> WorkerRecord:
    """Model, GPU memory, running job and its progress, and idle deadline of this worker."""
    return get_runtime().status(_hostname(state))


@control_command(name=OFFLOAD)
def offload(state: Any, **kwargs: Any) -> OffloadReply:
    """Free the model's GPU memory now, or when the running job ends ("deferred")."""
    return {**get_runtime().request_offload(), "worker": _hostname(state)}
