"""The Celery GPU worker: `celery -A worker worker -n gpu0@%h`.

Importing this package gives the configured Celery `app` (the web imports it to enqueue and to send
control commands) without importing torch or the engine; those load inside the first task.

    worker.celery_app   the app, configured from Settings on first use
    worker.config       Celery settings derived from Settings (pool, acks, visibility timeout)
    worker.tasks        personaplex.process_audio(job_id)
    worker.runner       one delivery of a job: idempotence, attempts, progress, cancel, outputs
    worker.runtime      the resident engine and the running job, shared by the worker's threads
    worker.control      gpu_status and offload control commands (+ caller helpers)
    worker.housekeeping heartbeat, idle offload and retention cleanup thread
"""

from worker import control, signals, tasks  # noqa: F401  (registers commands, hooks and the task)
from worker.celery_app import app, create_celery_app
from worker.config import TASK_NAME, celery_config

__all__ = ["TASK_NAME", "app", "celery_config", "create_celery_app"]
