"""Hearing that work is waiting: the worker's subscription to `Keys.ARRIVALS`.

A running loop with a free row used to find queued jobs only by looking, every
REFILL_CHECK_INTERVAL_S: on a GPU or a fast CPU a short job's whole run takes about that long, so
the look, not the model, set its latency. Now whatever queues work announces it
(`personaplex.jobs.announce_work`: a job created or requeued, a conversation asking for a row), this
thread hears it, and the loop looks before its next frame. Pub/sub loses messages while the
connection is down, so the loop still looks every REFILL_CHECK_INTERVAL_S without news, and the watch
counts as having heard something each time it (re)subscribes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from personaplex.jobs import Keys
from personaplex.subscription import POLL_S, relay

log = logging.getLogger(__name__)

RECONNECT_S = 1.0
"""Seconds between attempts to subscribe again after losing Redis."""


class ArrivalWatch:
    """A daemon thread subscribed to `Keys.ARRIVALS`: `heard()` until `clear()`, and `on_heard` per
    announcement (the idle loop's wake-up)."""

    def __init__(self, client: redis.Redis, on_heard: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._on_heard = on_heard
        self._heard = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="arrival-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(POLL_S + 1.0)

    def heard(self) -> bool:
        """Whether work was announced (or the watch (re)subscribed) since the last `clear`."""
        return self._heard.is_set()

    def clear(self) -> None:
        """Before a look: what is announced from now on calls for another."""
        self._heard.clear()

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is live now (announcements reach this worker)."""
        return self._subscribed.is_set()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except (RedisError, OSError) as exc:
                log.warning("the arrivals subscription lost Redis (%s); the loop looks on its own", exc)
            finally:
                self._subscribed.clear()
            self._stopping.wait(RECONNECT_S)

    def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(Keys.ARRIVALS)
            relay(pubsub, self._read, self._stopping.is_set)
        finally:
            pubsub.close()

    def _read(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            self._subscribed.set()
            self._announce()  # whatever was queued while this worker could not hear it
        elif message["type"] == "message":
            self._announce()

    def _announce(self) -> None:
        self._heard.set()
        self._on_heard()
