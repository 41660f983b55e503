"""The Celery GPU worker: `celery -A worker worker -n gpu0@%h`.

Importing this package (or any module of it) gives the configured Celery `app` without importing the
task, its runner, the runtime or torch: the app lists those modules in `include`, and Celery imports
them only where a worker starts. So the web, which imports worker.control and builds its producer from
worker.celery_app, carries none of the worker's machinery.

    worker.celery_app   the app, configured from Settings on first use
    worker.config       Celery settings derived from Settings (pool, acks, visibility timeout)
    worker.control      what callers use: the task name, send_job, and the control broadcast helpers
    worker.commands     the gpu_status and offload control commands (answered in the worker)
    worker.signals      worker lifecycle hooks: start and stop housekeeping
    worker.tasks        personaplex.process_audio(job_id)
    worker.runner       one delivery of a job: idempotence, attempts, progress, cancel, outputs
    worker.loop         the engine loop's own thread: handed jobs, claimed jobs, live conversations
    worker.arrivals     the subscription that tells a running loop work was queued
    worker.runtime      the resident engine and the running job, shared by the worker's threads
    worker.housekeeping heartbeat, idle offload and retention cleanup thread
"""

from worker.celery_app import app, create_celery_app
from worker.config import celery_config
from worker.control import TASK_NAME

__all__ = ["TASK_NAME", "app", "celery_config", "create_celery_app"]
