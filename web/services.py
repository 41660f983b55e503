"""The resources views share: settings, Redis, the job, batch and blob stores, the Celery producer.

`init_app` attaches them to the app; Redis connects lazily on first use, and the events hub (one
subscription shared by every socket, web/pubsub.py) starts in the process that first needs it. The
Celery client app is built from `worker`'s factory only when a view first needs it (it never
imports torch).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from flask import Flask, current_app
from redis.backoff import NoBackoff
from redis.retry import Retry

from personaplex.batches import BatchStore
from personaplex.custom_voices import VoiceStore
from personaplex.jobs import JobStore, WorkerRegistry
from personaplex.settings import Settings
from personaplex.storage import BlobStore, delete_expired, open_blob_store
from web.pubsub import EventHub

if TYPE_CHECKING:
    from celery import Celery

EXTENSION = "personaplex"

REDIS_CONNECT_TIMEOUT_S = 1.0
"""Seconds to wait for a TCP connection to Redis before answering 503."""

REDIS_SOCKET_TIMEOUT_S = 10.0
"""Seconds one Redis command may take (blobs can be tens of MB)."""

HEALTH_TIMEOUT_S = 0.5
"""Seconds each /health Redis call may take (no retry), so /health answers within 2 s even when
Redis hangs instead of refusing connections."""

REDIS_POOL_WAIT_S = 5.0
"""Seconds a request waits for a free connection of the API's pool before it answers 503."""

EVENTS_SOCKET_TIMEOUT_S = 5.0
"""Seconds one read on the events subscription may block once Redis has started to answer."""

LIVE_CONNECTIONS = 4096
"""Redis connections the live conversations of one web process may hold: about three each (the
relay's blocking read, the input, the alive checks), so some thousand conversations; redis-py's
default pool stops at 100."""

CLEANUP_INTERVAL_S = 600.0
"""Seconds between two sweeps of expired jobs and blobs from this web process."""


def redis_client(
    url: str,
    socket_timeout: float = REDIS_SOCKET_TIMEOUT_S,
    connect_timeout: float = REDIS_CONNECT_TIMEOUT_S,
    retries: int = 1,
    max_connections: int | None = None,
    health_check_interval: int = 30,
) -> redis.Redis:
    """A client that fails fast when Redis is down: short timeouts, immediate retries only.

    With `max_connections`, a bounded pool where a request waits up to REDIS_POOL_WAIT_S for a free
    connection rather than failing at once with "Too many connections".
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), retries),
        "health_check_interval": health_check_interval,
    }
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=REDIS_POOL_WAIT_S, **options
    )
    return redis.Redis(connection_pool=pool)


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    health_redis: redis.Redis
    live_redis: redis.Redis
    """Live conversations' own client: each open one blocks a connection on its output stream, so
    their pool is large (LIVE_CONNECTIONS; Redis takes 10,000 clients) and never starves the API's."""
    jobs: JobStore
    blobs: BlobStore
    workers: WorkerRegistry
    batches: BatchStore
    events: EventHub
    voices: VoiceStore
    _celery: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_cleanup: float = 0.0

    @property
    def celery(self) -> Celery:
        """The Celery app used to enqueue and to send control commands (imported lazily)."""
        if self._celery is None:
            with self._lock:
                if self._celery is None:
                    self._celery = celery_producer(self.settings)
        return self._celery

    def maybe_cleanup(self) -> None:
        """Delete expired jobs and blobs, at most once per CLEANUP_INTERVAL_S."""
        now = time.monotonic()
        if now - self._last_cleanup < CLEANUP_INTERVAL_S:
            return
        self._last_cleanup = now
        delete_expired(self.jobs, self.blobs)


def celery_producer(settings: Settings) -> Celery:
    """A Celery client app configured exactly like the workers, from this app's settings.

    Built per web app rather than mutating the shared `worker.app`, so test overrides (another Redis)
    and production (the environment) both get the right broker. Importing it loads no torch.
    """
    from worker.celery_app import create_celery_app

    return create_celery_app(settings)


def build_services(settings: Settings) -> Services:
    # Four clients, so none can starve another: the API's bounded pool, /health's own, the one
    # connection the events hub subscribes on for every socket and /api/offline waiter, and the
    # live conversations' pool.
    client = redis_client(settings.redis_url, max_connections=settings.redis_pool_size)
    # The hub pings on its own schedule; redis-py's health check would only swallow the pongs.
    events_client = redis_client(settings.redis_url, EVENTS_SOCKET_TIMEOUT_S, health_check_interval=0)
    return Services(
        settings=settings,
        redis=client,
        health_redis=redis_client(settings.redis_url, HEALTH_TIMEOUT_S, HEALTH_TIMEOUT_S, retries=0),
        live_redis=redis_client(
            settings.redis_url, EVENTS_SOCKET_TIMEOUT_S, max_connections=LIVE_CONNECTIONS
        ),
        jobs=JobStore(client, retention_s=settings.retention_s, dispatch_grace_s=settings.dispatch_grace_s),
        blobs=open_blob_store(settings, client),
        workers=WorkerRegistry(client),
        batches=BatchStore(client, retention_s=settings.retention_s),
        events=EventHub(events_client),
        voices=VoiceStore(client),
    )


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions[EXTENSION] = build_services(settings)


def services() -> Services:
    """The current app's services."""
    return current_app.extensions[EXTENSION]
