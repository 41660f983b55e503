"""Job events from Redis pub/sub: subscribe before reading state, so no event falls in between."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.client import PubSub

from personaplex.jobs import JobStatus, Keys
from web.services import Services

FINAL_EVENT_TYPES = frozenset(s.value for s in JobStatus if s.is_final)


@contextmanager
def subscription(svc: Services, job_id: str) -> Iterator[PubSub]:
    """A pub/sub connection subscribed to the job's events channel, closed on exit."""
    pubsub = svc.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(Keys.events(job_id))
        yield pubsub
    finally:
        pubsub.close()


def next_event(pubsub: PubSub, timeout: float) -> dict[str, Any] | None:
    """The next event on the channel, or None if none came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message.get("type") == "message":
            return json.loads(message["data"])


def is_final_event(event: dict[str, Any]) -> bool:
    return event.get("type") in FINAL_EVENT_TYPES
