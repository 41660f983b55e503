"""A client of WS /api/chat for the tests and the benchmark: the reference's protocol, PCM or Opus.

`ChatClient` connects, collects metadata until the handshake, then sends 16-bit PCM (or Ogg Opus
pages) and reads the server's messages on a thread of its own, so a test can send and read at once.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import numpy as np
import simple_websocket
from fixtures import ws_connect

from personaplex.conversations import from_pcm16, to_pcm16
from personaplex.params import FRAME_SIZE

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)


@dataclass
class Received:
    """What the server sent, in order of arrival."""

    metadata: list[dict] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    """Each 0x01 payload: 16-bit PCM in PCM mode, Ogg pages in Opus mode."""
    audio_at: list[float] = field(default_factory=list)
    """monotonic() when each audio message arrived."""
    errors: list[str] = field(default_factory=list)
    handshake_at: float | None = None

    def pcm(self) -> np.ndarray:
        return np.concatenate([from_pcm16(chunk) for chunk in self.audio]) if self.audio else np.zeros(0)


class ChatClient:
    """One conversation. `connect()` returns once the handshake came (or raises with what came instead)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, **query: object) -> None:
        self.url = base_url.replace("http://", "ws://") + "/api/chat?" + urlencode(query)
        self.headers = headers or {}
        self.received = Received()
        self.closed = threading.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._messages: queue.SimpleQueue[bytes | str] = queue.SimpleQueue()
        self.ws: simple_websocket.Client | None = None

    def open(self) -> ChatClient:
        """Connect and start reading (no wait for the handshake)."""
        self.ws = ws_connect(self.url, self.headers)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def connect(self, timeout: float = 60.0) -> ChatClient:
        if self.ws is None:
            self.open()
        deadline = time.monotonic() + timeout
        while self.received.handshake_at is None:
            if self.closed.is_set():
                raise AssertionError(f"closed before the handshake: {self.close_code} {self.received}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no handshake after {timeout} s: {self.received}")
            time.sleep(0.01)
        return self

    def send_pcm(self, samples: np.ndarray) -> None:
        assert self.ws is not None
        self.ws.send(bytes([AUDIO]) + to_pcm16(samples))

    def send_frames(self, samples: np.ndarray, pace_s: float = 0.0) -> list[float]:
        """`samples` in 80 ms frames (the last padded with zeros), `pace_s` apart; when each was sent."""
        frames = -(-len(samples) // FRAME_SIZE)
        padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
        padded[: len(samples)] = samples
        sent = []
        start = time.monotonic()
        for index in range(frames):
            if pace_s:
                time.sleep(max(start + index * pace_s - time.monotonic(), 0.0))
            sent.append(time.monotonic())
            self.send_pcm(padded[index * FRAME_SIZE : (index + 1) * FRAME_SIZE])
        return sent

    def wait_for_audio(self, messages: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received.audio) < messages:
            if self.closed.is_set():
                raise AssertionError(
                    f"closed after {len(self.received.audio)} audio messages: {self.close_code}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.received.audio)} of {messages} audio messages after {timeout} s"
                )
            time.sleep(0.01)

    def wait_closed(self, timeout: float = 10.0) -> None:
        assert self.closed.wait(timeout), f"still open after {timeout} s"

    def hang_up(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def _read(self) -> None:
        assert self.ws is not None
        try:
            while True:
                message = self.ws.receive()
                if isinstance(message, bytes) and message:
                    self._take(message)
        except simple_websocket.ConnectionClosed as closed:
            self.close_code, self.close_reason = closed.reason, closed.message
        finally:
            self.closed.set()

    def _take(self, message: bytes) -> None:
        kind, payload = message[0], message[1:]
        if kind == HANDSHAKE:
            self.received.handshake_at = time.monotonic()
        elif kind == METADATA:
            self.received.metadata.append(json.loads(payload))
        elif kind == TEXT:
            self.received.text.append(payload.decode())
        elif kind == AUDIO:
            self.received.audio.append(payload)
            self.received.audio_at.append(time.monotonic())
        elif kind == ERROR:
            self.received.errors.append(payload.decode())
