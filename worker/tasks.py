"""The one Celery task. Its only argument is the job id: audio travels through the blob store."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker.celery_app import app
from worker.control import TASK_NAME
from worker.runner import JobRunner
from worker.runtime import get_runtime


@app.task(name=TASK_NAME, bind=True, max_retries=None)  # retries only while another worker runs it
def process_audio(self: Task, job_id: str) -> dict[str, Any]:
    """Run job `job_id` on this worker's resident engine (see worker.runner for redelivery rules)."""
    worker = self.request.hostname or "unknown"
    outcome = JobRunner(get_runtime(), job_id, worker).run()
    if outcome.retry_in is not None:  # another worker runs it now: this slot is free meanwhile
        try:
            retry = self.retry(countdown=outcome.retry_in, throw=False)
        except Exception as exc:
            # The new message was not published (Celery then rejects this one without requeueing):
            # the job would have no message left if its worker died. Put this one back instead.
            raise Reject(exc, requeue=True) from exc
        raise retry
    return outcome.to_dict()
