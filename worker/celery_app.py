"""The Celery app. Importing it reads no environment and loads no torch: web imports it to enqueue.

Configuration is registered as a lazy default, so `Settings.from_env()` runs the first time the app's
configuration is read (when a worker starts, or when the web sends its first task).

The worker's own modules (task, control commands, lifecycle hooks) are the app's `include`: Celery
imports them when a worker starts, never in a process that only sends tasks and control commands.
"""

from __future__ import annotations

from celery import Celery

from personaplex.settings import Settings
from worker.config import celery_config

WORKER_MODULES = ("worker.commands", "worker.signals", "worker.tasks")
"""What a worker imports at start: the control commands, the housekeeping hooks and the task."""


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings`, or from the environment when it is first used."""
    app = Celery("personaplex", include=list(WORKER_MODULES))
    if settings is not None:
        app.conf.update(celery_config(settings))
    else:
        app.add_defaults(lambda: celery_config(Settings.from_env()))
    return app


app = create_celery_app()
