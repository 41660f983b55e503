"""Job events from Redis pub/sub, fanned out in-process: one subscription per web process.

Each event socket and /api/offline waiter used to hold a Redis connection of its own, so a few
hundred open sockets emptied the pool the API needs. Now one background thread per process (the
`EventHub`) holds one connection, pattern-subscribed to every job's events channel, and puts each
event into the queue of every `Waiter` registered for that job; a waiter costs no connection.

The old guarantee holds: a waiter is registered before the caller reads the job record, and
`EventHub.subscribe` returns only while the hub's subscription is live, so an event published after
the read reaches the waiter. When the hub loses Redis it tells every waiter (`LOST`: events may be
missed from now on), reconnects with backoff, and once subscribed again tells them `RESUMED`: re-read
the job record, since what happened in between is only there.

The hub starts lazily, in the process that first subscribes (gunicorn forks its workers after import;
a thread started before the fork would not exist in the child), and stops after `IDLE_STOP_S` with no
waiter, so an idle or finished app holds no connection and no thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any

import redis
from redis.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from personaplex.jobs import JobStatus, Keys
from personaplex.subscription import POLL_S, relay

if TYPE_CHECKING:
    from web.services import Services

log = logging.getLogger(__name__)

FINAL_EVENT_TYPES = frozenset(s.value for s in JobStatus if s.is_final)
EVENTS_PATTERN = Keys.PREFIX + "events:*"
EVENTS_CHANNEL_PREFIX = Keys.PREFIX + "events:"

SUBSCRIBE_WAIT_S = 2.0
"""Seconds `subscribe` waits for the hub's subscription to be live before it counts as Redis down."""

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
"""Backoff between reconnection attempts, doubling from the first to the second."""

IDLE_STOP_S = 30.0
"""Seconds without any waiter before the hub thread stops and lets its connection go."""


class Notice(Enum):
    """What the hub tells waiters besides events."""

    LOST = "lost"
    """The subscription broke: events may be missed until RESUMED."""
    RESUMED = "resumed"
    """Subscribed again: re-read the job, events published in between are gone."""


Event = dict[str, Any]


class Waiter:
    """One socket's or request's inbox for one job's events and the hub's notices."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        # queue.Queue, not SimpleQueue: its locks are threading's, which gevent patches.
        self._inbox: queue.Queue[Event | Notice] = queue.Queue()

    def put(self, item: Event | Notice) -> None:
        self._inbox.put(item)

    def get(self, timeout: float) -> Event | Notice | None:
        """The next event or notice, or None if none came within `timeout` seconds."""
        try:
            return self._inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


class EventHub:
    """One pattern subscription per process, fanned out to every registered `Waiter`."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._reset()

    def _reset(self) -> None:
        """Fresh state for this process: locks, waiters and thread are never inherited across fork."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._live = threading.Event()
        self._lost = False
        self._last_active = time.monotonic()
        self._thread: threading.Thread | None = None

    def subscribe(self, job_id: str, timeout: float = SUBSCRIBE_WAIT_S) -> Waiter:
        """Register a waiter for `job_id`; RedisConnectionError if the hub cannot subscribe in time.

        Once it returns, every event published on the job's channel reaches the waiter (or, if the
        subscription breaks, a LOST notice does), so the caller may read the job record next.
        """
        waiter = Waiter(job_id)
        with self._locked():
            self._waiters.setdefault(job_id, set()).add(waiter)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self._thread.start()
        if not self._live.wait(timeout):
            self.unsubscribe(waiter)
            raise RedisConnectionError("The events subscription to Redis is down.")
        return waiter

    def unsubscribe(self, waiter: Waiter) -> None:
        with self._locked():
            waiters = self._waiters.get(waiter.job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[waiter.job_id]
            self._last_active = time.monotonic()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._pid != os.getpid():  # forked: the parent's thread and waiters are not ours
            self._reset()
        with self._lock:
            yield

    # -- the hub thread --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        while True:
            try:
                self._serve()
                return  # idle: stopped on purpose
            except (RedisError, OSError) as exc:
                if self._live.is_set():
                    log.warning("The events subscription lost Redis (%s); reconnecting.", exc)
                    backoff = RECONNECT_MIN_S
                self._lose()
            if self._stop_if_idle():
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _serve(self) -> None:
        """Subscribe, then dispatch until idle for IDLE_STOP_S (returns) or Redis fails (raises)."""
        pubsub = self._client.pubsub()
        try:
            pubsub.psubscribe(EVENTS_PATTERN)
            self._await_confirmation(pubsub)
            self._resume()
            relay(pubsub, self._dispatch, self._stop_if_idle)
        finally:
            pubsub.close()

    def _await_confirmation(self, pubsub: PubSub) -> None:
        deadline = time.monotonic() + SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=POLL_S)
            if message is not None and message["type"] == "psubscribe":
                return
        raise RedisConnectionError("Redis did not confirm the events subscription.")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] != "pmessage":
            return  # pongs only prove the connection is alive
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        with self._locked():
            waiters = list(self._waiters.get(channel.removeprefix(EVENTS_CHANNEL_PREFIX), ()))
        if not waiters:
            return
        try:
            event = json.loads(message["data"])
        except ValueError:
            log.warning("Dropped a malformed event on %s", channel)
            return
        for waiter in waiters:
            waiter.put(event)  # the same dict for all: readers only serialise it

    def _resume(self) -> None:
        with self._locked():
            resumed, self._lost = self._lost, False
            self._live.set()
        if resumed:
            self._broadcast(Notice.RESUMED)

    def _lose(self) -> None:
        with self._locked():
            self._live.clear()
            first, self._lost = not self._lost, True
        if first:
            self._broadcast(Notice.LOST)

    def _broadcast(self, notice: Notice) -> None:
        with self._locked():
            waiters = [waiter for waiters in self._waiters.values() for waiter in waiters]
        for waiter in waiters:
            waiter.put(notice)

    def _stop_if_idle(self) -> bool:
        """Stop (under the lock, so the next subscriber starts a new thread) after idling long."""
        with self._locked():
            if self._waiters or time.monotonic() - self._last_active < IDLE_STOP_S:
                return False
            self._thread = None
            self._live.clear()
            self._lost = False  # nobody was waiting: the next subscriber reads the job anyway
            return True


@contextmanager
def subscription(svc: Services, job_id: str) -> Iterator[Waiter]:
    """A waiter on the job's events, registered with the process's hub; unregistered on exit."""
    waiter = svc.events.subscribe(job_id)
    try:
        yield waiter
    finally:
        svc.events.unsubscribe(waiter)


def is_final_event(event: Event | Notice) -> bool:
    return isinstance(event, dict) and event.get("type") in FINAL_EVENT_TYPES
