"""The one Celery task. Its only argument is the job id: audio travels through the blob store."""

from __future__ import annotations

from typing import Any

from celery import Task

from worker.celery_app import app
from worker.config import TASK_NAME
from worker.runner import JobRunner
from worker.runtime import get_runtime


@app.task(name=TASK_NAME, bind=True)
def process_audio(self: Task, job_id: str) -> dict[str, Any]:
    """Run job `job_id` on this worker's resident engine (see worker.runner for redelivery rules)."""
    worker = self.request.hostname or "unknown"
    return JobRunner(get_runtime(), job_id, worker).run().to_dict()
