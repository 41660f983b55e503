"""Celery configuration derived from `Settings`: the defaults a GPU worker needs (docs/architecture.md §1).

- threads pool, concurrency 1: control commands are answered from the process that holds the model
  while the single slot runs a job (prefork breaks CUDA; solo cannot answer while busy);
- acks_late + prefetch 1 + reject_on_worker_lost: a job whose worker dies is redelivered, never lost;
- broker visibility_timeout: how long an unacked job waits before it is redelivered. kombu sweeps for
  such messages every `unacked_restore_interval` seconds, scanning on every `unacked_restore_throttle`-th
  sweep (defaults 10 s x 10 = ~100 s); we derive both from the visibility timeout so that a short one
  (as in tests) also gets prompt redelivery, while the 6 h default keeps kombu's defaults.
"""

from __future__ import annotations

from typing import Any

from personaplex.settings import Settings

MAX_SWEEP_PERIOD_S = 100.0
"""Longest time between two scans for expired unacked messages (kombu's default period), seconds."""

KOMBU_RESTORE_INTERVAL_S = 10.0
"""kombu's default seconds between two `restore_visible` calls in the worker's event loop."""


def restore_schedule(visibility_timeout: float) -> dict[str, int]:
    """kombu transport options that scan for expired unacked messages about 5 times per timeout.

    The scan period is clamped to [1 s, 100 s]: one scan a second for a 5 s test timeout, kombu's
    own 10 s x 10 for anything over ~8 minutes.
    """
    period = min(MAX_SWEEP_PERIOD_S, max(1.0, visibility_timeout / 5))
    interval = min(KOMBU_RESTORE_INTERVAL_S, period)
    return {
        "unacked_restore_interval": max(1, round(interval)),
        "unacked_restore_throttle": max(1, round(period / interval)),
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for web (as a client) and worker alike."""
    transport_options = {
        "visibility_timeout": settings.visibility_timeout,
        **restore_schedule(settings.visibility_timeout),
    }
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_pool": "threads",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }
