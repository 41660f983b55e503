"""Reading a Redis pub/sub subscription that notices when its connection has died.

Shared by the web's event hub (web/pubsub.py) and the worker's arrival watch (worker/arrivals.py):
a subscriber only reads, so a half-open TCP connection to a Redis that vanished would leave it
waiting, deaf, forever; a ping now and then makes Redis answer, and silence past three of them
counts as a lost connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

POLL_S = 0.5
"""Seconds a reader blocks on its connection before it asks whether to stop, and pings if due."""

KEEPALIVE_S = 10.0
"""Seconds between pings; a connection silent for 3 x this is dropped."""


def relay(pubsub: PubSub, handle: Callable[[dict[str, Any]], None], stop: Callable[[], bool]) -> None:
    """Hand every message `pubsub` reads (confirmations and pongs too) to `handle` until `stop()`,
    asked at least every POLL_S; raises ConnectionError when Redis fails or falls silent."""
    last_heard = last_ping = time.monotonic()
    while not stop():
        message = pubsub.get_message(timeout=POLL_S)
        now = time.monotonic()
        if message is not None:
            last_heard = now
            handle(message)
        elif now - last_heard > 3 * KEEPALIVE_S:
            raise RedisConnectionError(f"no answer from Redis for {3 * KEEPALIVE_S:g} s")
        if now - last_ping > KEEPALIVE_S:
            pubsub.ping()  # its pong counts as hearing from Redis
            last_ping = now
