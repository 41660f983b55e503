"""A live conversation's audio in and out of its row of the loop.

`LiveSession` is the `LiveLink` (personaplex.engine.batching) of one conversation: the caller pushes
24 kHz samples as they arrive (any length; they are cut into 80 ms frames) and reads `LiveFrame`s
as they are generated. Between two frames the loop's thread asks it for the next input frame,
which it encodes with Mimi then (`StreamingEncoder`: the codes one-shot encoding gives), and hands
it each generated frame, which it decodes at once (`StreamingDecoder`) into that frame's 1920
samples. The loop never waits for a session: a row whose next frame has not arrived is paused.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import MimiModel

from personaplex.engine.streaming import StreamingDecoder, StreamingEncoder
from personaplex.params import FRAME_SIZE


@dataclass(frozen=True)
class LiveFrame:
    """One generated frame: its tokens (text, then 8 agent codes), its text piece, its audio."""

    tokens: list[int]
    text: str
    """The text token's piece, or a marker ("PAD", "EPAD") as in offline results."""
    audio: np.ndarray
    """1920 float32 samples at 24 kHz: the agent's audio for this frame."""


class LiveSession:
    """A conversation's `LiveLink`: pushed samples in, generated frames out (`frames`)."""

    def __init__(self, mimi: MimiModel, text_of: Callable[[int], str]) -> None:
        self._encoder = StreamingEncoder(mimi)
        self._decoder = StreamingDecoder(mimi)
        self._text_of = text_of
        self._pending = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()
        self._inputs: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._arrived = threading.Event()
        self._closing = threading.Event()
        self.frames: queue.SimpleQueue[LiveFrame] = queue.SimpleQueue()
        """Generated frames, in order, as the loop steps them."""

    # ---- the caller's side --------------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        """More of the user's audio (float32, 24 kHz mono); whole frames become inputs at once."""
        with self._lock:
            self._pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
            whole = len(self._pending) // FRAME_SIZE * FRAME_SIZE
            for start in range(0, whole, FRAME_SIZE):
                self._inputs.put(self._pending[start : start + FRAME_SIZE])
            self._pending = self._pending[whole:]
        self._arrived.set()

    def close(self) -> None:
        """The user is done: a partial last frame is padded with zeros (as offline), and the row
        leaves once the frames pushed so far are stepped."""
        with self._lock:
            if len(self._pending):
                padded = np.zeros(FRAME_SIZE, dtype=np.float32)
                padded[: len(self._pending)] = self._pending
                self._inputs.put(padded)
                self._pending = np.zeros(0, dtype=np.float32)
            self._closing.set()
        self._arrived.set()

    # ---- the loop's side (LiveLink) -------------------------------------------------------------
    def next_input(self) -> torch.Tensor | None:
        try:
            frame = self._inputs.get_nowait()
        except queue.Empty:
            return None
        return self._encoder.encode(torch.from_numpy(frame)[None])[0, :, 0]

    def deliver(self, frame: torch.Tensor) -> None:
        tokens = frame.tolist()
        audio = self._decoder.decode(frame[1:].view(1, -1, 1))[0].cpu().numpy()
        self.frames.put(LiveFrame(tokens, self._text_of(tokens[0]), audio))

    def closed(self) -> bool:
        return self._closing.is_set() and self._inputs.empty()

    def wait(self, timeout: float) -> None:
        self._arrived.wait(timeout)
        self._arrived.clear()

    def ready(self) -> None:
        """Nothing to do: its caller reads frames as they come."""
